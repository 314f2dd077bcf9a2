"""Scenes a small model can localise in, with a detail that only a close-up makes readable.

The laptop-scale stand-in for MGPO's high-resolution questions (`python -m mgpo_jax.repro`):

- the background's colour encodes position (red grows with x, green with y): a smooth, low-frequency
  code that survives any downscaling, so a vision tower with rotary positions only can tell where a
  thing is (the CoordConv remedy for translation-equivariant networks);
- `num_objects` squares of distinct saturated colours, each about one merged vision token (28 px) in
  the model's input view, on a lattice with a few pixels of jitter; drawn as frames (`ring`), so the
  background's position code shows inside a square's own vision tokens (with solid squares a 1.5M
  model never learned to box a named one: bench/results/repro/base/probes/ring_probes.md);
- in the middle of each square, a dot of one of four colours: `dot_side` (3) input pixels in the
  view, a tenth of a 14 px patch, but about one patch once a box around its square is cropped and
  enlarged to the input size (6x). A patch that averages its pixels reads a colour that covers it; the
  dot covers 5% of its patch in the view and most of one in the crop.

The question names a square by its colour (visible at any resolution) and asks for its dot's colour:
"What color is the dot on the red square?", the four dot colours as options, always in the same order.

    img, objects = render_scene(np.random.default_rng(0), SceneConfig())
    sample = question_sample(seed, SceneConfig())       # a schema.Sample, with object_boxes

Everything is drawn from the seed, so a seed always gives the same PNG bytes. `box` is in original
pixels and `box_in` in the model's input pixels (original / scale), exclusive right/bottom.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from mgpo_jax.data import schema

# The squares' colours (named in questions) and the dots' colours (the answers): far apart from each
# other and from the muted background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 25),
    "green": (20, 170, 40),
    "blue": (30, 50, 235),
    "yellow": (245, 215, 0),
    "orange": (255, 125, 0),
    "purple": (130, 30, 175),
}
DOT_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "cyan": (0, 235, 235),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
OPTIONS: tuple[str, ...] = tuple(DOT_COLORS)  # in this order in every question

CATEGORY = "scene_dot"
QUESTION = "What color is the dot on the {color} square?"


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """Sizes of a scene, in the model's input pixels unless said otherwise.

  Attributes:
    input_side: side of the model's input view (the processor's min/max_pixels must give it).
    scale: original pixels per input pixel (the original's side is input_side * scale).
    num_objects: squares per scene (distinct colours).
    object_side: side of a square (> 28, the protocol's smallest box side, so its own box is valid).
    dot_side: side of the dot in a square's middle.
    lattice: squares sit on this grid (about one merged token), at least two steps apart.
    jitter: +- pixels a square moves off its lattice point (the dot's phase on the patch grid varies).
    ring: width of a square's coloured frame; inside it the background shows, so the square's own
      vision tokens carry the position code (0: a solid square, whose tokens hide it).
  """

  input_side: int = 224
  scale: int = 2
  num_objects: int = 4
  object_side: int = 36
  dot_side: int = 3
  lattice: int = 28
  jitter: int = 4
  ring: int = 6

  def __post_init__(self):
    if self.scale < 1:
      raise ValueError(f"scale must be >= 1, got {self.scale}")
    if not 1 <= self.num_objects <= len(COLORS):  # 1: a first stage of a referring curriculum
      raise ValueError(f"num_objects must be in [1, {len(COLORS)}], got {self.num_objects}")
    if not 28 < self.object_side <= self.input_side:
      raise ValueError(f"object_side must be in (28, input_side]: a box must be larger than 28 px; "
                       f"got {self.object_side}")
    if not 1 <= self.dot_side < self.object_side:
      raise ValueError(f"dot_side must be in [1, object_side), got {self.dot_side}")
    if self.lattice < 1 or not 0 <= self.jitter < self.lattice:
      raise ValueError(f"need lattice >= 1 and 0 <= jitter < lattice, got {self.lattice}, {self.jitter}")
    if not 0 <= 2 * self.ring < self.object_side - self.dot_side:
      raise ValueError(f"ring must be in [0, (object_side - dot_side) / 2), got {self.ring}")
    if ((len(self.slots()) + 1) // 2) ** 2 < self.num_objects:
      raise ValueError(f"{self.num_objects} squares do not fit {self.input_side} px on a {self.lattice} px lattice")

  @property
  def side(self) -> int:
    """The original image's side in pixels."""
    return self.input_side * self.scale

  def slots(self) -> list[int]:
    """Lattice coordinates (input pixels) of a square's top-left corner along one axis, centred."""
    n = (self.input_side - self.object_side) // self.lattice + 1
    off = (self.input_side - ((n - 1) * self.lattice + self.object_side)) // 2
    return [off + i * self.lattice for i in range(n)]


@dataclasses.dataclass(frozen=True)
class SceneObject:
  color: str
  dot: str
  box: tuple[int, int, int, int]     # original pixels
  box_in: tuple[int, int, int, int]  # input pixels


def render_scene(rng: np.random.Generator, cfg: SceneConfig,
                 dots: Sequence[str] | None = None) -> tuple[Image.Image, list[SceneObject]]:
  """One scene; `dots` fixes the squares' dot colours (default: drawn)."""
  side, s = cfg.side, cfg.scale
  xs = np.linspace(0.0, 1.0, side, dtype=np.float32)
  img = np.empty((side, side, 3), np.float32)
  img[..., 0] = 90 + 110 * xs[None, :]
  img[..., 1] = 90 + 110 * xs[:, None]
  img[..., 2] = 130
  slots = cfg.slots()
  cells: list[tuple[int, int]] = []
  tries = 0
  while len(cells) < cfg.num_objects:  # rejection sampling; the config checks that they fit
    i, j = int(rng.integers(len(slots))), int(rng.integers(len(slots)))
    if all(max(abs(i - a), abs(j - b)) >= 2 for a, b in cells):
      cells.append((i, j))
    tries += 1
    if tries % 256 == 0:  # the squares so far can leave no room (a tight lattice): start over
      cells = []
  colors = [str(c) for c in rng.choice(list(COLORS), size=cfg.num_objects, replace=False)]
  drawn = [OPTIONS[int(k)] for k in rng.integers(len(OPTIONS), size=cfg.num_objects)]
  jit = rng.integers(-cfg.jitter, cfg.jitter + 1, size=(cfg.num_objects, 2))
  dots = list(dots) if dots is not None else drawn
  objects = []
  hi = cfg.input_side - cfg.object_side
  n, d = cfg.object_side * s, cfg.dot_side * s
  for (i, j), color, dot, (dx, dy) in zip(cells, colors, dots, jit):
    x_in, y_in = min(max(slots[i] + int(dx), 0), hi), min(max(slots[j] + int(dy), 0), hi)
    x0, y0 = x_in * s, y_in * s
    if cfg.ring:  # the frame only: the background (the position code) shows inside
      r = cfg.ring * s
      for sl in ((slice(y0, y0 + r), slice(x0, x0 + n)), (slice(y0 + n - r, y0 + n), slice(x0, x0 + n)),
                 (slice(y0, y0 + n), slice(x0, x0 + r)), (slice(y0, y0 + n), slice(x0 + n - r, x0 + n))):
        img[sl] = COLORS[color]
    else:
      img[y0:y0 + n, x0:x0 + n] = COLORS[color]
    o = (n - d) // 2
    img[y0 + o:y0 + o + d, x0 + o:x0 + o + d] = DOT_COLORS[dot]
    objects.append(SceneObject(color, dot, (x0, y0, x0 + n, y0 + n),
                               (x_in, y_in, x_in + cfg.object_side, y_in + cfg.object_side)))
  return Image.fromarray(np.rint(img).astype(np.uint8), mode="RGB"), objects


def encode_png(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def question(color: str) -> str:
  return QUESTION.format(color=color)


def question_sample(seed: int, cfg: SceneConfig, sample_id: str | None = None) -> schema.Sample:
  """A scene and the question about one of its squares, drawn from `seed`."""
  rng = np.random.default_rng(seed)
  img, objects = render_scene(rng, cfg)
  target = objects[int(rng.integers(len(objects)))]
  return {
      schema.ID: sample_id if sample_id is not None else f"scene-{seed}",
      schema.QUESTION: question(target.color),
      schema.CHOICES: list(OPTIONS),
      schema.ANSWER: schema.letter(OPTIONS.index(target.dot)),
      schema.CATEGORY: CATEGORY,
      schema.IMAGE: encode_png(img),
      schema.TARGET_BOX: list(target.box),
      schema.OBJECT_BOXES: [list(o.box) for o in objects],
  }


def _sample_seed(seed: int, i: int) -> int:
  return int(np.random.SeedSequence([seed, i]).generate_state(1, dtype=np.uint32)[0])


def iter_split(n: int, seed: int, cfg: SceneConfig) -> Iterator[schema.Sample]:
  """`n` question samples, lazily; the same (n, seed, cfg) always gives the same samples."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  for i in range(n):
    yield question_sample(_sample_seed(seed, i), cfg, sample_id=f"scene-s{seed}-{i:06d}")
