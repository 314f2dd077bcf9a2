"""The sample schema shared by every data source, the builder and the input pipeline.

A *sample* is one multiple-choice visual question:

  {"id": str, "question": str, "choices": list[str], "answer": str (option letter),
   "image": bytes (encoded PNG/JPEG)  OR  "image_path": str,
   "category": str, optional "target_box": [x1, y1, x2, y2],
   optional "object_boxes": [[x1, y1, x2, y2], ...]}

`choices` hold the option texts WITHOUT their "(A) " prefixes; the letter of choice i is
`OPTION_LETTERS[i]`. `target_box` is in original-image pixels with exclusive right/bottom edges;
it exists only for analysis and visualisation — training never reads it. `object_boxes` (the same
units) are the boxes of every object of a synthetic scene, for the random-crop control
(`rollout.random_crop`), at most `MAX_OBJECTS`.

After the pipeline decodes the image, a *decoded sample* carries `"image": PIL.Image` (RGB) instead.
"""

from __future__ import annotations

import enum
from typing import Any, Mapping, Sequence, TypedDict

import numpy as np
from PIL import Image

# Field names, so that producers and consumers cannot drift apart.
ID = "id"
QUESTION = "question"
CHOICES = "choices"
ANSWER = "answer"
IMAGE = "image"
IMAGE_PATH = "image_path"
CATEGORY = "category"
TARGET_BOX = "target_box"
OBJECT_BOXES = "object_boxes"

REQUIRED_FIELDS = (ID, QUESTION, CHOICES, ANSWER, CATEGORY)
OPTION_LETTERS = "ABCDEFGHIJ"
MIN_CHOICES = 2

# TFDS stores a missing target_box as this sentinel (features cannot be optional).
NO_BOX = (-1, -1, -1, -1)
# object_boxes are stored as MAX_OBJECTS rows, padded with NO_BOX.
MAX_OBJECTS = 8


class Category(enum.StrEnum):
  """Question categories of the synthetic generator (eval sets keep their own names)."""

  COLOR = "color"
  SHAPE = "shape"


class _SampleBase(TypedDict):
  id: str
  question: str
  choices: list[str]
  answer: str
  category: str


class Sample(_SampleBase, total=False):
  """A sample before image decoding: exactly one of `image` / `image_path` is set."""

  image: bytes
  image_path: str
  target_box: list[int]
  object_boxes: list[list[int]]


class DecodedSample(_SampleBase, total=False):
  """A sample as the pipeline yields it: the image decoded to RGB."""

  image: Image.Image
  image_path: str
  target_box: list[int]
  object_boxes: list[list[int]]


def letter(index: int) -> str:
  """Option letter of choice `index` (0 -> "A")."""
  if not 0 <= index < len(OPTION_LETTERS):
    raise ValueError(f"choice index {index} out of range [0, {len(OPTION_LETTERS)})")
  return OPTION_LETTERS[index]


def _as_str(value: Any) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, np.ndarray) and value.shape == ():
    return _as_str(value.item())
  return str(value)


def normalize_sample(record: Mapping[str, Any]) -> Sample:
  """Checks a record and converts it to plain Python types (TFDS gives bytes / numpy arrays).

  Raises:
    ValueError: a required field is missing, the answer is not a valid option letter, or the
      record has neither or both of `image` / `image_path`.
  """
  rid = _as_str(record[ID]) if ID in record else "<no id>"
  missing = [f for f in REQUIRED_FIELDS if f not in record]
  if missing:
    raise ValueError(f"sample {rid}: missing field(s) {missing}")
  choices = [_as_str(c) for c in record[CHOICES]]
  if len(choices) < MIN_CHOICES or len(choices) > len(OPTION_LETTERS):
    raise ValueError(
        f"sample {rid}: needs {MIN_CHOICES}..{len(OPTION_LETTERS)} choices, got {len(choices)}"
    )
  answer = _as_str(record[ANSWER]).strip()
  if answer not in OPTION_LETTERS[: len(choices)]:
    raise ValueError(
        f"sample {rid}: answer {answer!r} is not one of the option letters "
        f"{OPTION_LETTERS[: len(choices)]!r}"
    )
  out: Sample = {
      ID: rid,
      QUESTION: _as_str(record[QUESTION]),
      CHOICES: choices,
      ANSWER: answer,
      CATEGORY: _as_str(record[CATEGORY]),
  }
  image = record.get(IMAGE)
  path = record.get(IMAGE_PATH)
  if path is not None and _as_str(path) == "":
    path = None  # TFDS-style empty string means "absent".
  if (image is None) == (path is None):
    raise ValueError(f"sample {rid}: needs exactly one of {IMAGE!r} (bytes) or {IMAGE_PATH!r}")
  if image is not None:
    if isinstance(image, np.ndarray):
      image = image.item()
    if not isinstance(image, (bytes, bytearray)):
      raise ValueError(f"sample {rid}: {IMAGE!r} must be encoded bytes, got {type(image).__name__}")
    out[IMAGE] = bytes(image)
  else:
    out[IMAGE_PATH] = _as_str(path)
  box = record.get(TARGET_BOX)
  if box is not None:
    box = [int(v) for v in np.asarray(box).reshape(-1)]
    if len(box) != 4:
      raise ValueError(f"sample {rid}: {TARGET_BOX!r} must have 4 values, got {len(box)}")
    if tuple(box) != NO_BOX:
      out[TARGET_BOX] = box
  objects = record.get(OBJECT_BOXES)
  if objects is not None:
    rows = np.asarray(objects, np.int64).reshape(-1, 4) if len(objects) else np.zeros((0, 4), np.int64)
    if len(rows) > MAX_OBJECTS:
      raise ValueError(f"sample {rid}: {OBJECT_BOXES!r} holds {len(rows)} boxes, more than {MAX_OBJECTS}")
    kept = [[int(v) for v in r] for r in rows if tuple(r) != NO_BOX]
    if kept:
      out[OBJECT_BOXES] = kept
  return out


def strip_option_prefix(text: str) -> str:
  """'(A) red' -> 'red'; 'A. red' -> 'red'; text without a prefix is returned stripped."""
  s = text.strip()
  if len(s) >= 3 and s[0] == "(" and s[2] == ")" and s[1] in OPTION_LETTERS:
    return s[3:].strip()
  if len(s) >= 2 and s[0] in OPTION_LETTERS and s[1] in ".:)" and (len(s) == 2 or s[2] == " "):
    return s[2:].strip()
  return s


def choices_from(options: Sequence[str]) -> list[str]:
  """Option texts without their letter prefixes."""
  return [strip_option_prefix(o) for o in options]
