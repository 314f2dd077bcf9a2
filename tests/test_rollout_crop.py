"""Tests for mgpo_jax.rollout.crop: box mapping to the original image and cropping it."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mgpo_jax.rollout.crop import crop_original, map_box_to_original

PROPERTY = settings(max_examples=300, deadline=None, database=None)


@pytest.mark.parametrize(
    "box, input_size, original_size, expected",
    [
        # Whole image -> whole original.
        ((0, 0, 868, 644), (868, 644), (1921, 1427), (0, 0, 1921, 1427)),
        # 100*1921/868 = 221.31, 50*1427/644 = 110.79, 400*1921/868 = 885.25, 300*1427/644 = 664.75.
        ((100, 50, 400, 300), (868, 644), (1921, 1427), (221, 110, 885, 664)),
        # Touching the right/bottom border: 840*1921/868 = 1859.03, 616*1427/644 = 1364.96.
        ((840, 616, 868, 644), (868, 644), (1921, 1427), (1859, 1364, 1921, 1427)),
        # Touching the top-left corner.
        # 29*1921/868 = 64.18, 29*1427/644 = 64.26.
        ((0, 0, 29, 29), (868, 644), (1921, 1427), (0, 0, 64, 64)),
        # Original smaller than the input (enlarged by min_pixels):
        # 30*300/476 = 18.9, 100*200/308 = 64.9.
        ((30, 0, 476, 100), (476, 308), (300, 200), (18, 0, 300, 64)),
        # Same size: identity.
        ((5, 6, 70, 80), (868, 644), (868, 644), (5, 6, 70, 80)),
        # The protocol's float formula, not the exact floor: 527/868*3024 is exactly 1836 in
        # rationals, but 527 / 868 * 3024 evaluates to 1835.9999999999998 in floats -> 1835.
        ((527, 0, 868, 644), (868, 644), (3024, 4032), (1835, 0, 3024, 4032)),
    ],
)
def test_map_box_hand_computed(box, input_size, original_size, expected):
  assert map_box_to_original(box, input_size, original_size) == expected


def test_map_box_accepts_numpy_ints():
  box = np.array([100, 50, 400, 300], dtype=np.int64)
  assert map_box_to_original(box, (np.int32(868), 644), (1921, 1427)) == (221, 110, 885, 664)
  assert all(type(v) is int for v in map_box_to_original(box, (868, 644), (1921, 1427)))


@st.composite
def box_and_sizes(draw):
  w_in = draw(st.integers(1, 80)) * 28
  h_in = draw(st.integers(1, 80)) * 28
  x1 = draw(st.integers(0, w_in - 1))
  y1 = draw(st.integers(0, h_in - 1))
  x2 = draw(st.integers(x1 + 1, w_in))
  y2 = draw(st.integers(y1 + 1, h_in))
  original = (draw(st.integers(1, 5000)), draw(st.integers(1, 5000)))
  return (x1, y1, x2, y2), (w_in, h_in), original


@PROPERTY
@given(case=box_and_sizes())
def test_map_box_properties(case):
  box, (w_in, h_in), (w_o, h_o) = case
  mapped = map_box_to_original(box, (w_in, h_in), (w_o, h_o))
  x1, y1, x2, y2 = box
  assert mapped == (
      int(x1 / w_in * w_o), int(y1 / h_in * h_o), int(x2 / w_in * w_o), int(y2 / h_in * h_o)
  )
  # Inside the original, monotone, and within one pixel below the exact rational floor.
  ox1, oy1, ox2, oy2 = mapped
  assert 0 <= ox1 <= ox2 <= w_o and 0 <= oy1 <= oy2 <= h_o
  for v, size_in, size_o, out in ((x1, w_in, w_o, ox1), (y1, h_in, h_o, oy1),
                                  (x2, w_in, w_o, ox2), (y2, h_in, h_o, oy2)):
    exact = v * size_o // size_in
    assert exact - 1 <= out <= exact
  if box == (0, 0, w_in, h_in):
    assert mapped == (0, 0, w_o, h_o)


@pytest.mark.parametrize(
    "box, input_size, original_size, match",
    [
        ((0, 0, 869, 644), (868, 644), (1921, 1427), "inside the input"),
        ((-1, 0, 100, 100), (868, 644), (1921, 1427), "inside the input"),
        ((0, 0, 100, 645), (868, 644), (1921, 1427), "inside the input"),
        ((100, 0, 100, 100), (868, 644), (1921, 1427), "inside the input"),
        ((200, 0, 100, 100), (868, 644), (1921, 1427), "inside the input"),
        ((0.0, 0, 100, 100), (868, 644), (1921, 1427), "4 ints"),
        ((True, 0, 100, 100), (868, 644), (1921, 1427), "4 ints"),
        ((0, 0, 100), (868, 644), (1921, 1427), "4 ints"),
        (None, (868, 644), (1921, 1427), "4 ints"),
        ((0, 0, 100, 100), (0, 644), (1921, 1427), "input_size"),
        ((0, 0, 100, 100), (868,), (1921, 1427), "input_size"),
        ((0, 0, 100, 100), (868, 644), (1921.0, 1427), "original_size"),
    ],
)
def test_map_box_errors(box, input_size, original_size, match):
  with pytest.raises(ValueError, match=match):
    map_box_to_original(box, input_size, original_size)


def _random_image(width, height, mode, seed=0):
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
  shape = (height, width) if channels is None else (height, width, channels)
  return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)


def test_crop_hand_computed_content():
  original = _random_image(1921, 1427, "RGB")
  crop = crop_original(original, (100, 50, 400, 300), (868, 644))
  assert crop.size == (885 - 221, 664 - 110)
  assert crop.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(crop), np.asarray(original)[110:664, 221:885])
  # Border box reaches the last row and column of the original.
  crop = crop_original(original, (840, 616, 868, 644), (868, 644))
  np.testing.assert_array_equal(np.asarray(crop), np.asarray(original)[1364:1427, 1859:1921])


@PROPERTY
@given(case=box_and_sizes(), mode=st.sampled_from(["RGB", "RGBA", "L"]), seed=st.integers(0, 3))
def test_crop_equals_numpy_slice(case, mode, seed):
  box, input_size, (w_o, h_o) = case
  w_o, h_o = 1 + w_o % 300, 1 + h_o % 300  # Keep images small.
  original = _random_image(w_o, h_o, mode, seed)
  x1, y1, x2, y2 = map_box_to_original(box, input_size, (w_o, h_o))
  if x1 >= x2 or y1 >= y2:
    with pytest.raises(ValueError, match="empty region"):
      crop_original(original, box, input_size)
    return
  crop = crop_original(original, box, input_size)
  assert crop.mode == mode and crop.size == (x2 - x1, y2 - y1)
  np.testing.assert_array_equal(np.asarray(crop), np.asarray(original)[y1:y2, x1:x2])


def test_crop_errors():
  original = _random_image(1921, 1427, "RGB")
  with pytest.raises(ValueError, match="inside the input"):
    crop_original(original, (0, 0, 900, 100), (868, 644))
  # A tiny original: a 29-pixel box of an 868-wide input is 0.33 pixels of a 10-pixel original.
  with pytest.raises(ValueError, match="empty region"):
    crop_original(_random_image(10, 10, "RGB"), (0, 0, 29, 29), (868, 644))


def test_crop_does_not_alias_original():
  original = _random_image(64, 64, "RGB")
  crop = crop_original(original, (0, 0, 28, 28), (56, 56))
  before = np.asarray(crop).copy()
  original.paste((0, 0, 0), (0, 0, 64, 64))
  np.testing.assert_array_equal(np.asarray(crop), before)
