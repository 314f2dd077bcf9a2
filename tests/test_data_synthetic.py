"""Tests of the synthetic V*-like generator."""

import collections
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mgpo_jax.data import schema
from mgpo_jax.data import synthetic

SMALL = synthetic.SyntheticConfig(image_size=(96, 128), target_size=(10, 16))
TEST_SIZE = synthetic.SyntheticConfig(image_size=(448, 448), target_size=(12, 16))


def _pixels(sample) -> np.ndarray:
  img = Image.open(io.BytesIO(sample[schema.IMAGE]))
  assert img.format == "PNG"
  return np.asarray(img.convert("RGB"), dtype=np.int32)


def _near(px_HWC: np.ndarray, rgb, tol: int = 24) -> np.ndarray:
  return np.abs(px_HWC - np.asarray(rgb, dtype=np.int32)).max(-1) <= tol


def test_same_seed_same_bytes_different_seed_differs():
  a = synthetic.generate_sample(7, TEST_SIZE)
  b = synthetic.generate_sample(7, TEST_SIZE)
  c = synthetic.generate_sample(8, TEST_SIZE)
  assert a == b
  assert a[schema.IMAGE] != c[schema.IMAGE]
  assert synthetic.generate_split(6, 3, SMALL) == synthetic.generate_split(6, 3, SMALL)
  ids = [s[schema.ID] for s in synthetic.generate_split(6, 3, SMALL) + synthetic.generate_split(6, 4, SMALL)]
  assert len(set(ids)) == 12


def test_schema_fields_and_image_size_in_range():
  for s in synthetic.generate_split(8, 0, SMALL):
    assert schema.normalize_sample(s) == s
    assert len(s[schema.CHOICES]) == 4 and len(set(s[schema.CHOICES])) == 4
    w, h = Image.open(io.BytesIO(s[schema.IMAGE])).size
    assert 96 <= w <= 128 and 96 <= h <= 128


def test_answers_and_categories_balanced():
  n = 40
  split = synthetic.generate_split(n, 11, SMALL)
  letters = collections.Counter(s[schema.ANSWER] for s in split)
  assert letters == {"A": 10, "B": 10, "C": 10, "D": 10}
  cats = collections.Counter(s[schema.CATEGORY] for s in split)
  assert cats == {"color": 20, "shape": 20}
  # Not a fixed pattern by position (the letter must not be predictable from the index).
  seq = [s[schema.ANSWER] for s in split]
  assert seq != [schema.OPTION_LETTERS[i % 4] for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_target_visible_unique_and_correctly_labelled(seed):
  sample = synthetic.generate_sample(seed, TEST_SIZE)
  px = _pixels(sample)
  x1, y1, x2, y2 = sample[schema.TARGET_BOX]
  assert 0 <= x1 < x2 <= px.shape[1] and 0 <= y1 < y2 <= px.shape[0]
  assert 8 <= x2 - x1 <= 17 and 8 <= y2 - y1 <= 17

  inside = np.zeros(px.shape[:2], bool)
  inside[y1:y2, x1:x2] = True
  # Which palette colour does the target show?
  counts = {name: int(_near(px, rgb)[inside].sum()) for name, rgb in synthetic.COLORS.items()}
  color = max(counts, key=counts.get)
  box_area = (x2 - x1) * (y2 - y1)
  assert counts[color] >= 0.25 * box_area
  target_mask = _near(px, synthetic.COLORS[color])
  # The box is tight: the target touches all four edges.
  sub = target_mask[y1:y2, x1:x2]
  assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any()
  # The target is the only saturated object: no palette colour anywhere outside its box.
  for rgb in synthetic.COLORS.values():
    assert not _near(px, rgb)[~inside].any()

  answer = sample[schema.CHOICES][schema.OPTION_LETTERS.index(sample[schema.ANSWER])]
  if sample[schema.CATEGORY] == schema.Category.COLOR:
    assert answer == color
    assert color not in sample[schema.QUESTION]
  else:
    assert color in sample[schema.QUESTION]

    # Shape: the answer's outline must match the drawn pixels far better than the other options.
    def iou(name):
      best = 0.0
      for s in range(max(x2 - x1, y2 - y1) - 1, max(x2 - x1, y2 - y1) + 3):
        m = Image.new("L", (s + 4, s + 4))
        synthetic.SHAPES[name](ImageDraw.Draw(m), (1, 1, 1 + s, 1 + s), 255)
        bb = m.getbbox()
        mm = np.asarray(m.crop(bb)) > 0
        if mm.shape != sub.shape:
          continue
        best = max(best, (mm & sub).sum() / (mm | sub).sum())
      return best

    scores = {c: iou(c) for c in sample[schema.CHOICES]}
    assert scores[answer] > 0.9
    assert all(v < scores[answer] for c, v in scores.items() if c != answer)


def test_question_names_the_other_attribute():
  for s in synthetic.generate_split(8, 5, SMALL):
    if s[schema.CATEGORY] == schema.Category.COLOR:
      assert s[schema.QUESTION].startswith("What is the color of the small ")
      assert set(s[schema.CHOICES]) <= set(synthetic.COLORS)
    else:
      assert s[schema.QUESTION].startswith("What is the shape of the small ")
      assert set(s[schema.CHOICES]) <= set(synthetic.SHAPES)


def test_answer_index_and_category_overrides():
  s = synthetic.generate_sample(3, SMALL, answer_index=2, category=schema.Category.SHAPE, sample_id="x")
  assert s[schema.ANSWER] == "C" and s[schema.CATEGORY] == "shape" and s[schema.ID] == "x"
  with pytest.raises(ValueError, match="answer_index"):
    synthetic.generate_sample(3, SMALL, answer_index=4)


def test_jpeg_option():
  cfg = synthetic.SyntheticConfig(image_size=(96, 96), target_size=(10, 12), image_format="JPEG")
  s = synthetic.generate_sample(0, cfg)
  assert Image.open(io.BytesIO(s[schema.IMAGE])).format == "JPEG"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=(200, 100)), "image_size"),
        (dict(image_size=(96, 96), target_size=(10, 60)), "target_size"),
        (dict(clutter_alpha=(0.1, 0.9)), "clutter_alpha"),
        (dict(num_choices=9), "num_choices"),
        (dict(categories=("size",)), "size"),
        (dict(categories=()), "categories"),
        (dict(categories=("pattern",)), "pattern"),  # retired with the from-scratch repro
    ],
)
def test_bad_config_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    synthetic.SyntheticConfig(**kwargs)


def test_sorted_choices():
  cfg = synthetic.SyntheticConfig(image_size=(96, 96), target_size=(10, 12), sorted_choices=True)
  s = synthetic.generate_sample(4, cfg, category=schema.Category.COLOR)
  assert s[schema.CHOICES] == sorted(s[schema.CHOICES])
  with pytest.raises(ValueError, match="sorted_choices"):
    synthetic.generate_sample(4, cfg, answer_index=1)


def test_colors_restrict_the_palette_and_fix_each_letter():
  four = ("blue", "green", "red", "yellow")
  cfg = synthetic.SyntheticConfig(image_size=(96, 96), target_size=(10, 12), categories=("color",),
                                  colors=four, sorted_choices=True)
  samples = synthetic.generate_split(24, 3, cfg)
  for s in samples:
    assert s[schema.CHOICES] == list(four)  # every option every time, always in the same order
    px = np.asarray(Image.open(io.BytesIO(s[schema.IMAGE])).convert("RGB")).astype(int)
    x1, y1, x2, y2 = s[schema.TARGET_BOX]
    centre = px[(y1 + y2) // 2, (x1 + x2) // 2]
    colour = four[schema.OPTION_LETTERS.index(s[schema.ANSWER])]
    assert np.abs(centre - np.asarray(synthetic.COLORS[colour])).max() <= 40  # the letter names the colour drawn
  assert len({s[schema.ANSWER] for s in samples}) == 4
  # The default palette is every colour: existing samples keep their bytes.
  assert synthetic.SyntheticConfig().palette() == sorted(synthetic.COLORS)
  for bad in (("blue", "teal"), ("blue", "blue", "red"), ("blue",)):
    with pytest.raises(ValueError, match="colors"):
      synthetic.SyntheticConfig(categories=("color",), colors=bad)
