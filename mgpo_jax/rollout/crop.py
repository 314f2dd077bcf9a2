"""Maps a grounding box from model-input pixels to the original image, and crops (protocol step 4).

The model sees the image resized to (W_in, H_in) (multiples of 28) and answers in those pixels;
the crop is taken from the ORIGINAL full-resolution image, so that small regions gain detail
when the processor enlarges the crop again (min_pixels).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from PIL import Image

Box = tuple[int, int, int, int]


def _ints(name: str, value: Sequence[int], n: int) -> tuple[int, ...]:
  """`value` as a tuple of `n` Python ints (numpy ints accepted; bools are not coordinates)."""
  try:
    items = tuple(value)
  except TypeError:
    items = ()
  if len(items) != n or not all(
      isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items
  ):
    raise ValueError(f"{name} must be {n} ints, got {value!r}")
  return tuple(int(v) for v in items)


def _check_size(name: str, size: Sequence[int]) -> tuple[int, int]:
  w, h = _ints(name, size, 2)
  if w <= 0 or h <= 0:
    raise ValueError(f"{name} must be a positive (width, height), got {size!r}")
  return w, h


def map_box_to_original(
    box: Sequence[int], input_size: Sequence[int], original_size: Sequence[int]
) -> Box:
  """Maps (x1, y1, x2, y2) from input pixels to original pixels.

  Uses exactly the protocol's float formula x_orig = int(x / W_in * W_orig) (likewise y), which
  truncates towards zero and may differ by one from the exact rational floor.

  Args:
    box: (x1, y1, x2, y2) in input pixels, right/bottom exclusive, 0 <= x1 < x2 <= W_in and
      0 <= y1 < y2 <= H_in.
    input_size: (W_in, H_in), the size of the image as given to the model.
    original_size: (W_orig, H_orig).

  Returns:
    The box in original pixels, right/bottom exclusive.

  Raises:
    ValueError: if a size is malformed or the box is not 4 ints inside the input image.
  """
  w_in, h_in = _check_size("input_size", input_size)
  w_orig, h_orig = _check_size("original_size", original_size)
  x1, y1, x2, y2 = _ints("box (x1, y1, x2, y2)", box, 4)
  if not (0 <= x1 < x2 <= w_in and 0 <= y1 < y2 <= h_in):
    raise ValueError(
        f"box {(x1, y1, x2, y2)} is not a non-empty box inside the input image of size "
        f"{w_in}x{h_in}"
    )
  return (
      int(x1 / w_in * w_orig),
      int(y1 / h_in * h_orig),
      int(x2 / w_in * w_orig),
      int(y2 / h_in * h_orig),
  )


def crop_original(
    image: Image.Image, box_in: Sequence[int], input_size: Sequence[int]
) -> Image.Image:
  """Crops the original image at the region `box_in` names in input pixels.

  Args:
    image: the ORIGINAL full-resolution image.
    box_in: (x1, y1, x2, y2) in pixels of the resized model input.
    input_size: (W_in, H_in) of that input.

  Returns:
    A new image with the original's pixels [y1:y2, x1:x2] of the mapped box.

  Raises:
    ValueError: if the box is outside the input image, or maps to an empty region of the original
      (possible only for originals much smaller than the input).
  """
  x1, y1, x2, y2 = map_box_to_original(box_in, input_size, image.size)
  if x1 >= x2 or y1 >= y2:
    raise ValueError(
        f"box {tuple(box_in)} in the {input_size[0]}x{input_size[1]} input maps to the empty "
        f"region {(x1, y1, x2, y2)} of the {image.size[0]}x{image.size[1]} original"
    )
  # PIL's crop box is (left, upper, right, lower) with right/lower exclusive, like ours.
  return image.crop((x1, y1, x2, y2))


def target_coverage(box: Sequence[int], input_size: Sequence[int], original_size: Sequence[int],
                    target: Sequence[int]) -> float:
  """Share of `target`'s area (original pixels, right/bottom exclusive) inside the crop of `box`.

  For analysis only (e.g. whether a model's box finds the synthetic task's target); training never
  sees target boxes.
  """
  x1, y1, x2, y2 = map_box_to_original(box, input_size, original_size)
  tx1, ty1, tx2, ty2 = _ints("target", target, 4)
  area = (tx2 - tx1) * (ty2 - ty1)
  if area <= 0:
    raise ValueError(f"target must have a positive area, got {target!r}")
  inter = max(0, min(x2, tx2) - max(x1, tx1)) * max(0, min(y2, ty2) - max(y1, ty1))
  return inter / area
