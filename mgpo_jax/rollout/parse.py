"""Parses the grounding box out of the model's turn-1 text (MGPO protocol, step 4).

The model answers turn 1 with a fenced block in Qwen2.5-VL's grounding format::

    ```json
    [{"bbox_2d": [x1, y1, x2, y2], "label": "the red car"}]
    ```

with integer coordinates in absolute pixels of the resized model input (W_in x H_in). The first
entry whose `bbox_2d` is 4 ints and whose `label` is a string is THE box; it is valid iff

    0 <= x1 < x2 <= W_in,  0 <= y1 < y2 <= H_in,  x2 - x1 > 28,  y2 - y1 > 28,
    max(w / h, h / w) < 100

(no clamping, no padding). Only the first ```json block counts, because the turn is truncated
right after it (`truncate_after_json`). Without any ```json fence, a bare JSON list in the text
(Qwen's grounding output sometimes omits the fence) is used instead.

All work is linear in the text length: locating candidates uses `str.find` and a regex without
nested quantifiers, JSON is decoded by the stdlib C scanner, and the number of failed decode
attempts of the bare-list fallback is capped, so adversarial text ("[[[[...", "```json" x 10^5)
cannot make parsing quadratic. `parse_bbox` never raises on any text. Deep nesting is stopped by
the C scanner's recursion check (RecursionError, caught); a process that raises
`sys.setrecursionlimit` far above its default can overflow the C stack there on CPython 3.11.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from typing import Any

Box = tuple[int, int, int, int]

# Minimum box side (exclusive) and maximum aspect ratio (exclusive), from the protocol.
MIN_BOX_SIDE = 28
MAX_ASPECT_RATIO = 100

# Texts longer than this are scanned only up to here (turn 1 is at most 8192 tokens).
DEFAULT_MAX_CHARS = 1 << 17
# The bare-list fallback tries at most this many candidates that fail to decode; each failure
# costs at most O(n), so the fallback stays O(n) for any text.
MAX_FAILED_DECODES = 32

JSON_FENCE_OPEN = "```json"
JSON_FENCE_CLOSE = "```"


@dataclasses.dataclass(frozen=True)
class StopAfter:
  """A stop rule for the sampler: stop at the first `stop` that follows the first `opener`.

  A plain stop string cannot express "the closing fence of the json block", because the opening
  fence "```json" itself starts with "```".
  """

  opener: str
  stop: str

  def end(self, text: str) -> int | None:
    """Index just past the stop string, or None if the rule has not fired in `text`."""
    start = text.find(self.opener)
    if start < 0:
      return None
    close = text.find(self.stop, start + len(self.opener))
    return None if close < 0 else close + len(self.stop)


# Turn 1 ends with the closing fence of the first ```json block.
TURN1_STOP = StopAfter(opener=JSON_FENCE_OPEN, stop=JSON_FENCE_CLOSE)


def truncate_after_json(text: str) -> str:
  """Keeps `text` up to and including the closing fence of its first ```json block.

  Text without a complete ```json block is returned unchanged.
  """
  end = TURN1_STOP.end(text)
  return text if end is None else text[:end]


class BBoxReason(enum.StrEnum):
  """Why a parse gave (or did not give) a valid box. Checks run in this order."""

  OK = "ok"
  NO_JSON = "no_json"  # No ```json block and no decodable bare JSON list.
  BAD_JSON = "bad_json"  # The ```json block does not hold valid JSON (e.g. truncated).
  NO_BBOX = "no_bbox"  # JSON decoded, but no entry has a "bbox_2d".
  BAD_SHAPE = "bad_shape"  # "bbox_2d" is not a list of 4 values.
  NOT_INT = "not_int"  # A coordinate is not an int (floats, bools, strings, ...).
  BAD_LABEL = "bad_label"  # Strict mode: "label" missing or not a string.
  OUT_OF_BOUNDS = "out_of_bounds"  # Outside [0, W_in] x [0, H_in].
  NOT_ORDERED = "not_ordered"  # x1 >= x2 or y1 >= y2.
  TOO_SMALL = "too_small"  # A side is <= 28 pixels.
  ASPECT_RATIO = "aspect_ratio"  # max(w/h, h/w) >= 100.


@dataclasses.dataclass(frozen=True)
class BBoxResult:
  """The outcome of `parse_bbox`.

  Attributes:
    box: (x1, y1, x2, y2) in input pixels of the selected entry, set whenever a well-formed entry
      was found, even if it failed the validity rules (for logging); check `valid` before use.
    valid: whether `box` satisfies every rule of the protocol.
    reason: `BBoxReason.OK` iff valid, else the first reason the parse failed.
    label: the entry's label, if it had a string one.
  """

  box: Box | None
  valid: bool
  reason: BBoxReason
  label: str | None = None


def check_box(box: Box, width: int, height: int) -> BBoxReason:
  """Applies the protocol's validity rules to an integer box; returns OK or the failed rule."""
  x1, y1, x2, y2 = box
  if not (0 <= x1 <= width and 0 <= x2 <= width and 0 <= y1 <= height and 0 <= y2 <= height):
    return BBoxReason.OUT_OF_BOUNDS
  if x1 >= x2 or y1 >= y2:
    return BBoxReason.NOT_ORDERED
  w, h = x2 - x1, y2 - y1
  if w <= MIN_BOX_SIDE or h <= MIN_BOX_SIDE:
    return BBoxReason.TOO_SMALL
  # max(w/h, h/w) < R  <=>  max(w, h) < R * min(w, h); integers, so no float rounding.
  if max(w, h) >= MAX_ASPECT_RATIO * min(w, h):
    return BBoxReason.ASPECT_RATIO
  return BBoxReason.OK


def _as_int(value: Any, lenient: bool) -> int | None:
  # bool is a subclass of int, but `true` is not a coordinate.
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if lenient and isinstance(value, float) and math.isfinite(value):
    return round(value)
  return None


def _is_bare_box(value: Any) -> bool:
  """[x1, y1, x2, y2] of JSON numbers (lenient mode's bare box)."""
  return (
      isinstance(value, list)
      and len(value) == 4
      and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
  )


def _read_entry(entry: Any, lenient: bool) -> tuple[Box | None, str | None, BBoxReason | None]:
  """Reads one entry.

  Returns (box, label, None) if well-formed, (None, None, reason) for a broken bbox entry, and
  (None, None, None) for something that is not a bbox entry at all.
  """
  if isinstance(entry, dict):
    if "bbox_2d" not in entry:
      return None, None, None
    coords, label = entry["bbox_2d"], entry.get("label")
  elif lenient and _is_bare_box(entry):
    coords, label = entry, None
  else:
    return None, None, None
  if not isinstance(coords, list) or len(coords) != 4:
    return None, None, BBoxReason.BAD_SHAPE
  ints = [_as_int(v, lenient) for v in coords]
  if any(v is None for v in ints):
    return None, None, BBoxReason.NOT_INT
  if not isinstance(label, str):
    if not lenient:
      return None, None, BBoxReason.BAD_LABEL
    label = None
  return (ints[0], ints[1], ints[2], ints[3]), label, None


def _entries(value: Any, lenient: bool) -> list[Any]:
  """The entries of a decoded JSON value: a list's items, or a lone object as one entry."""
  if isinstance(value, dict):
    return [value]
  if isinstance(value, list):
    return [value] if lenient and _is_bare_box(value) else value
  return []


class _Selector:
  """Walks entries in order and keeps the first well-formed (or first valid) one."""

  def __init__(self, width: int, height: int, lenient: bool, skip_invalid: bool):
    self.width, self.height = width, height
    self.lenient, self.skip_invalid = lenient, skip_invalid
    self.first_failure: BBoxResult | None = None  # First broken / invalid entry, for `reason`.
    self.result: BBoxResult | None = None  # Set once the selection is final.

  def feed(self, value: Any) -> None:
    for entry in _entries(value, self.lenient):
      box, label, broken = _read_entry(entry, self.lenient)
      if broken is not None:
        if self.first_failure is None:
          self.first_failure = BBoxResult(box=None, valid=False, reason=broken)
        continue
      if box is None:
        continue
      reason = check_box(box, self.width, self.height)
      result = BBoxResult(box=box, valid=reason == BBoxReason.OK, reason=reason, label=label)
      if result.valid or not self.skip_invalid:
        self.result = result
        return
      if self.first_failure is None:
        self.first_failure = result

  def finish(self, nothing_found: BBoxReason) -> BBoxResult:
    if self.result is not None:
      return self.result
    if self.first_failure is not None:
      return self.first_failure
    return BBoxResult(box=None, valid=False, reason=nothing_found)


# A '[' that may open a list of objects (strict), or also a list of numbers / lists and a lone
# object (lenient). Lookaheads keep matches zero-width so that overlapping starts ("[[{") are all
# seen; `\s*` runs after distinct '[' are disjoint, so the whole scan is linear.
_STRICT_START = re.compile(r"\[(?=\s*\{)")
_LENIENT_START = re.compile(r"\[(?=\s*[\[\{\-\d])|\{(?=\s*\")")
_DECODER = json.JSONDecoder()


def _decode(text: str, start: int = 0, *, whole: bool = False) -> tuple[Any, int] | None:
  """Decodes one JSON value at `start`; None on any failure (including deep nesting)."""
  try:
    if whole:
      return json.loads(text), len(text)
    return _DECODER.raw_decode(text, start)
  except (ValueError, RecursionError):  # JSONDecodeError, int digit limits, nesting depth.
    return None


def parse_bbox(
    text: str,
    width: int,
    height: int,
    *,
    lenient: bool = False,
    skip_invalid: bool = False,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> BBoxResult:
  """Parses and validates the grounding box of a turn-1 reply.

  Args:
    text: the model's turn-1 text (anything; never raises on it).
    width: W_in, the width of the image as given to the model, in pixels.
    height: H_in, likewise.
    lenient: also accept float coordinates (rounded), bare [x1, y1, x2, y2] lists, entries
      without a string label, and trailing text after the JSON value inside the fence.
    skip_invalid: keep looking past well-formed entries that break the rules and take the first
      valid one. The protocol (default False) takes the first well-formed entry, valid or not.
    max_chars: only this many leading characters of `text` are scanned.

  Returns:
    A `BBoxResult`.

  Raises:
    ValueError: if `width` or `height` is not a positive int (a caller bug, not a model error).
  """
  for name, size in (("width", width), ("height", height)):
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
      raise ValueError(f"parse_bbox: {name} must be a positive int, got {size!r}")
  if not isinstance(text, str):
    return BBoxResult(box=None, valid=False, reason=BBoxReason.NO_JSON)
  text = text[:max_chars]
  selector = _Selector(width, height, lenient, skip_invalid)

  open_at = text.find(JSON_FENCE_OPEN)
  if open_at >= 0:
    body_start = open_at + len(JSON_FENCE_OPEN)
    close_at = text.find(JSON_FENCE_CLOSE, body_start)
    # An unclosed fence (stop string stripped by the sampler, or out of tokens) runs to the end.
    body = text[body_start:] if close_at < 0 else text[body_start:close_at]
    # Strict: the block must be exactly one JSON value; lenient: its first value counts.
    decoded = _decode(body.lstrip()) if lenient else _decode(body, whole=True)
    if decoded is None:
      return BBoxResult(box=None, valid=False, reason=BBoxReason.BAD_JSON)
    selector.feed(decoded[0])
    return selector.finish(nothing_found=BBoxReason.NO_BBOX)

  # No fence: scan bare JSON values left to right. A decoded value is consumed whole, so no
  # character is decoded twice by successful attempts; failed attempts are capped.
  pattern = _LENIENT_START if lenient else _STRICT_START
  resume_at, failures, decoded_any = 0, 0, False
  for match in pattern.finditer(text):
    start = match.start()
    if start < resume_at:
      continue
    decoded = _decode(text, start)
    if decoded is None:
      failures += 1
      if failures >= MAX_FAILED_DECODES:
        break
      continue
    decoded_any = True
    value, resume_at = decoded
    selector.feed(value)
    if selector.result is not None:
      break
  return selector.finish(nothing_found=BBoxReason.NO_BBOX if decoded_any else BBoxReason.NO_JSON)
