"""Deterministic V*-like synthetic samples: a large cluttered image with ONE small target object.

The question asks for the target's colour ("What is the color of the small star?") or its shape
("What is the shape of the small red object?"), with `num_choices` options. Clutter is faint
(blended towards the background), so the only saturated object in the image is the target: at full
resolution its attribute is plain, but once the image is shrunk to a low `max_pixels` the
`target_size`-pixel object covers only a few input pixels and its shape (and, for the smallest
sizes, its colour) becomes unreadable. With the defaults (sides 1000-2000 px, target 14-22 px) a
2000 px image shrunk to the protocol's 1M-pixel budget leaves a 7-11 px target; at 448x448 it is
3-5 px.

Everything is drawn from `np.random.default_rng(seed)`, so one seed always gives the same PNG
bytes. `target_box` records the target's tight box (exclusive right/bottom) for analysis only.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import math
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from mgpo_jax.data import schema

# Well-separated, saturated colours; clutter is kept far from all of them (see _faint).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (20, 160, 40),
    "blue": (30, 60, 225),
    "yellow": (240, 210, 0),
    "purple": (140, 30, 180),
    "orange": (255, 120, 0),
}

Box = tuple[int, int, int, int]
ShapeDrawer = Callable[[ImageDraw.ImageDraw, Box, object], None]

# Registry of shape drawers by name, filled by @_register_shape below.
SHAPES: dict[str, ShapeDrawer] = {}


def _register_shape(name: str) -> Callable[[ShapeDrawer], ShapeDrawer]:
  def deco(fn: ShapeDrawer) -> ShapeDrawer:
    SHAPES[name] = fn
    return fn

  return deco


@_register_shape("circle")
def _circle(draw: ImageDraw.ImageDraw, box: Box, fill) -> None:
  draw.ellipse(box, fill=fill)


@_register_shape("square")
def _square(draw: ImageDraw.ImageDraw, box: Box, fill) -> None:
  draw.rectangle(box, fill=fill)


@_register_shape("triangle")
def _triangle(draw: ImageDraw.ImageDraw, box: Box, fill) -> None:
  x1, y1, x2, y2 = box
  draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)


@_register_shape("star")
def _star(draw: ImageDraw.ImageDraw, box: Box, fill) -> None:
  x1, y1, x2, y2 = box
  cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
  pts = []
  for k in range(10):
    rad = r if k % 2 == 0 else 0.42 * r
    a = -math.pi / 2 + k * math.pi / 5
    pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
  draw.polygon(pts, fill=fill)


@_register_shape("diamond")
def _diamond(draw: ImageDraw.ImageDraw, box: Box, fill) -> None:
  x1, y1, x2, y2 = box
  cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
  draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)


@_register_shape("cross")
def _cross(draw: ImageDraw.ImageDraw, box: Box, fill) -> None:
  x1, y1, x2, y2 = box
  t = (x2 - x1) / 3
  draw.rectangle((x1 + t, y1, x2 - t, y2), fill=fill)
  draw.rectangle((x1, y1 + t, x2, y2 - t), fill=fill)


class ImageFormat(enum.StrEnum):
  PNG = "PNG"
  JPEG = "JPEG"


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Settings of the generator (sizes in pixels).

  Attributes:
    image_size: (min, max) of each image side; width and height are drawn independently.
    target_size: (min, max) side of the target's square footprint.
    clutter_per_mpix: faint clutter shapes per million image pixels.
    lines_per_mpix: faint clutter lines per million image pixels.
    clutter_alpha: (min, max) blend weight of a clutter colour over the background; kept low so
      no clutter pixel comes near a target colour.
    noise_std: std of the Gaussian pixel noise of the background.
    categories: question categories to draw from (balanced over a split).
    num_choices: options per question.
    image_format: encoding of the stored image bytes.
    square: draw square images (side drawn from `image_size`), so every image has the same
      model-input grid at a fixed pixel budget.
    sorted_choices: list the options in alphabetical order (the answer letter then names the value
      directly) instead of at a drawn position; `answer_index` is then decided by the value.
    colors: names of `COLORS` the target's colour is drawn from (empty: all of them). With as many
      colours as `num_choices` and `sorted_choices`, each letter always means the same colour.
  """

  image_size: tuple[int, int] = (1000, 2000)
  target_size: tuple[int, int] = (14, 22)
  clutter_per_mpix: float = 40.0
  lines_per_mpix: float = 20.0
  clutter_alpha: tuple[float, float] = (0.06, 0.22)
  noise_std: float = 3.0
  categories: tuple[schema.Category, ...] = (schema.Category.COLOR, schema.Category.SHAPE)
  num_choices: int = 4
  image_format: ImageFormat = ImageFormat.PNG
  square: bool = False
  sorted_choices: bool = False
  colors: tuple[str, ...] = ()

  def __post_init__(self):
    lo, hi = self.image_size
    if not 64 <= lo <= hi:
      raise ValueError(f"image_size must satisfy 64 <= min <= max, got {self.image_size}")
    tlo, thi = self.target_size
    if not 6 <= tlo <= thi or thi * 2 > lo:
      raise ValueError(
          f"target_size must satisfy 6 <= min <= max <= image min side / 2, got {self.target_size}"
      )
    alo, ahi = self.clutter_alpha
    if not 0.0 <= alo <= ahi <= 0.3:
      raise ValueError(f"clutter_alpha must satisfy 0 <= min <= max <= 0.3, got {self.clutter_alpha}")
    if not self.categories:
      raise ValueError("categories must not be empty")
    for c in self.categories:
      schema.Category(c)  # Raises ValueError on an unknown name.
    unknown = sorted(set(self.colors) - set(COLORS))
    if unknown or len(set(self.colors)) != len(self.colors):
      raise ValueError(f"colors must be distinct names of {sorted(COLORS)}, got {self.colors}")
    if self.colors and len(self.colors) < schema.MIN_CHOICES:
      raise ValueError(f"colors must name at least {schema.MIN_CHOICES} colours, got {self.colors}")
    values = {schema.Category.COLOR: self.palette(), schema.Category.SHAPE: SHAPES}
    most = min([len(values[schema.Category(c)]) for c in self.categories] + [len(schema.OPTION_LETTERS)])
    if not schema.MIN_CHOICES <= self.num_choices <= most:
      raise ValueError(f"num_choices must be in [{schema.MIN_CHOICES}, {most}], got {self.num_choices}")
    ImageFormat(self.image_format)

  def palette(self) -> list[str]:
    """The target colours, sorted."""
    return sorted(self.colors or COLORS)


def _background(rng: np.random.Generator, w: int, h: int, noise_std: float) -> np.ndarray:
  """A light, slightly tinted gradient with pixel noise, uint8 [h, w, 3]."""
  base = rng.uniform(190.0, 230.0) + rng.uniform(-8.0, 8.0, size=3)
  gx, gy = rng.uniform(-15.0, 15.0, size=2)
  ramp_HW = gx * np.linspace(-1, 1, w, dtype=np.float32)[None, :] + gy * np.linspace(
      -1, 1, h, dtype=np.float32
  )[:, None]
  img_HWC = base.astype(np.float32)[None, None, :] + ramp_HW[:, :, None]
  img_HWC += rng.normal(0.0, noise_std, size=(h, w, 3)).astype(np.float32)
  return np.clip(np.rint(img_HWC), 0, 255).astype(np.uint8)


def _faint(rng: np.random.Generator, bg: np.ndarray, alpha: tuple[float, float]) -> tuple[int, int, int]:
  a = rng.uniform(*alpha)
  c = rng.uniform(0, 255, size=3)
  return tuple(int(v) for v in np.rint((1 - a) * bg + a * c))


def _draw_clutter(
    rng: np.random.Generator, img: Image.Image, bg_mean: np.ndarray, cfg: SyntheticConfig
) -> None:
  w, h = img.size
  draw = ImageDraw.Draw(img)
  mpix = w * h / 1e6
  names = sorted(SHAPES)
  for _ in range(int(round(cfg.clutter_per_mpix * mpix))):
    s = int(rng.integers(24, max(25, min(w, h) // 6)))
    x, y = int(rng.integers(-s // 2, w - s // 2)), int(rng.integers(-s // 2, h - s // 2))
    SHAPES[names[rng.integers(len(names))]](draw, (x, y, x + s, y + s), _faint(rng, bg_mean, cfg.clutter_alpha))
  for _ in range(int(round(cfg.lines_per_mpix * mpix))):
    pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
    draw.line(pts, fill=_faint(rng, bg_mean, cfg.clutter_alpha), width=int(rng.integers(1, 4)))


def _encode(img: Image.Image, fmt: ImageFormat) -> bytes:
  buf = io.BytesIO()
  if fmt == ImageFormat.JPEG:
    img.save(buf, format="JPEG", quality=95)
  else:
    img.save(buf, format="PNG", compress_level=6)
  return buf.getvalue()


def _question(category: schema.Category, color: str, shape: str,
              palette: list[str]) -> tuple[str, str, list[str]]:
  """(question, correct value, all values of the asked attribute)."""
  if category == schema.Category.COLOR:
    return f"What is the color of the small {shape}?", color, palette
  return f"What is the shape of the small {color} object?", shape, sorted(SHAPES)


def generate_sample(
    seed: int,
    cfg: SyntheticConfig = SyntheticConfig(),
    *,
    answer_index: int | None = None,
    category: schema.Category | None = None,
    sample_id: str | None = None,
) -> schema.Sample:
  """Draws one sample; the same arguments always give the same sample (and image bytes).

  Args:
    seed: seed of everything random in the sample.
    cfg: generator settings.
    answer_index: position of the correct option (default: drawn from the seed).
    category: which attribute is asked (default: drawn from `cfg.categories`).
    sample_id: id to record (default `synthetic-<seed>`).
  """
  rng = np.random.default_rng(seed)
  lo, hi = cfg.image_size
  w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
  if cfg.square:
    h = w
  bg_HWC = _background(rng, w, h, cfg.noise_std)
  bg_mean = bg_HWC.reshape(-1, 3).mean(0)
  img = Image.fromarray(bg_HWC, mode="RGB")
  _draw_clutter(rng, img, bg_mean, cfg)

  palette = cfg.palette()
  color = palette[rng.integers(len(palette))]
  shape = sorted(SHAPES)[rng.integers(len(SHAPES))]
  s = int(rng.integers(cfg.target_size[0], cfg.target_size[1] + 1))
  margin = max(8, s)
  x, y = int(rng.integers(margin, w - margin - s)), int(rng.integers(margin, h - margin - s))
  if category is None:
    category = cfg.categories[rng.integers(len(cfg.categories))]
  category = schema.Category(category)
  SHAPES[shape](ImageDraw.Draw(img), (x, y, x + s, y + s), COLORS[color])
  # Tight box of what was actually drawn: render the same shape into a small mask.
  mask = Image.new("L", (s + 3, s + 3))
  SHAPES[shape](ImageDraw.Draw(mask), (1, 1, 1 + s, 1 + s), 255)
  mx1, my1, mx2, my2 = mask.getbbox()
  target_box = [x - 1 + mx1, y - 1 + my1, x - 1 + mx2, y - 1 + my2]

  question, correct, values = _question(category, color, shape, palette)
  others = [v for v in values if v != correct]
  distractors = [others[i] for i in rng.permutation(len(others))[: cfg.num_choices - 1]]
  if cfg.sorted_choices:
    if answer_index is not None:
      raise ValueError("answer_index cannot be chosen with sorted_choices=True (the value decides it)")
    choices = sorted(distractors + [correct])
    answer_index = choices.index(correct)
  else:
    if answer_index is None:
      answer_index = int(rng.integers(cfg.num_choices))
    if not 0 <= answer_index < cfg.num_choices:
      raise ValueError(f"answer_index must be in [0, {cfg.num_choices}), got {answer_index}")
    choices = distractors[:answer_index] + [correct] + distractors[answer_index:]

  return {
      schema.ID: sample_id if sample_id is not None else f"synthetic-{seed}",
      schema.QUESTION: question,
      schema.CHOICES: choices,
      schema.ANSWER: schema.letter(answer_index),
      schema.CATEGORY: str(category),
      schema.IMAGE: _encode(img, cfg.image_format),
      schema.TARGET_BOX: target_box,
  }


def _sample_seed(seed: int, i: int) -> int:
  return int(np.random.SeedSequence([seed, i]).generate_state(1, dtype=np.uint32)[0])


def iter_split(n: int, seed: int, cfg: SyntheticConfig = SyntheticConfig()) -> Iterator[schema.Sample]:
  """Yields `n` samples lazily; categories (and, unless `sorted_choices`, answer letters) are balanced
  to within one."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  rng = np.random.default_rng([seed, n])
  # A shuffled round-robin gives exact balance without tying the letter to the position.
  answers = rng.permutation(np.arange(n) % cfg.num_choices)
  categories = rng.permutation(np.arange(n) % len(cfg.categories))
  for i in range(n):
    yield generate_sample(
        _sample_seed(seed, i),
        cfg,
        answer_index=None if cfg.sorted_choices else int(answers[i]),
        category=cfg.categories[int(categories[i])],
        sample_id=f"synthetic-s{seed}-{i:06d}",
    )


def generate_split(n: int, seed: int, cfg: SyntheticConfig = SyntheticConfig()) -> list[schema.Sample]:
  """`n` samples as a list (see `iter_split`)."""
  return list(iter_split(n, seed, cfg))
