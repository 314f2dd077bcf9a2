"""Tests for mgpo_jax.rollout.parse: turn-1 box parsing, validity rules, truncation, linear time."""

import json
import math
import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mgpo_jax.rollout import parse
from mgpo_jax.rollout.parse import BBoxReason, parse_bbox, truncate_after_json

W, H = 868, 644
_SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=1000, **_SETTINGS)  # Cheap strategies: plain and fragment text.
SOME = settings(max_examples=300, **_SETTINGS)  # Structured JSON strategies are slower to draw.


# ---------------------------------------------------------------------------------------------
# Independent oracles (written from the protocol text, not from the implementation).


def follows_rules(box, width, height):
  """The protocol's validity rule, with exact rational aspect ratio."""
  if len(box) != 4 or not all(type(v) is int for v in box):
    return False
  x1, y1, x2, y2 = box
  if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
    return False
  w, h = x2 - x1, y2 - y1
  return w > 28 and h > 28 and max(Fraction(w, h), Fraction(h, w)) < 100


def _number(v, lenient):
  if type(v) is int:
    return v
  if lenient and type(v) is float and math.isfinite(v):
    return round(v)
  return None


def reference_select(value, lenient=False):
  """(box, label) of the first well-formed entry of a decoded JSON value, or None."""
  def is_bare_box(v):
    return isinstance(v, list) and len(v) == 4 and all(type(c) in (int, float) for c in v)

  if isinstance(value, dict):
    entries = [value]
  elif isinstance(value, list):
    entries = [value] if (lenient and is_bare_box(value)) else value
  else:
    entries = []
  for e in entries:
    if isinstance(e, dict) and "bbox_2d" in e:
      coords, label = e["bbox_2d"], e.get("label")
    elif lenient and is_bare_box(e):
      coords, label = e, None
    else:
      continue
    if not isinstance(coords, list) or len(coords) != 4:
      continue
    nums = [_number(v, lenient) for v in coords]
    if any(n is None for n in nums):
      continue
    if not isinstance(label, str):
      if not lenient:
        continue
      label = None
    return tuple(nums), label
  return None


# ---------------------------------------------------------------------------------------------
# Strategies: random and adversarial text.

FRAGMENTS = [
    "```json", "```", "```json\n", "\n```", "[", "]", "{", "}", "[{", "}]", '"bbox_2d"', '"label"',
    ":", ",", " ", "\n", '"', "\\", "1", "-5", "0", "868", "644", "12.0", "1e999", "-1e999", "NaN",
    "Infinity", "true", "false", "null", "99999999999999999999999", '"car"', "é", "车",
    "\U0001f600",
    "\x00", "\u2028", '{"bbox_2d": [10, 20, 300, 400], "label": "x"}', "[10, 20, 300, 400]",
    '[{"bbox_2d": [', '"bbox_2d": [0, 0, 868, 644]', "<|im_end|>", "\\boxed{A}",
]

fragment_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4), st.integers(-10**6, 10**6).map(str)),
    max_size=40,
).map("".join)

any_text = st.one_of(st.text(max_size=300), fragment_text)

coordinate = st.one_of(
    st.integers(-50, 1000),
    st.integers(),
    st.integers(0, 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-10, 1000).map(lambda f: float(round(f))),  # 12.0-style integral floats
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)


@st.composite
def near_valid_box(draw):
  """Boxes around the rule thresholds, so that valid and invalid both come up often."""
  x1 = draw(st.integers(-3, W + 3))
  y1 = draw(st.integers(-3, H + 3))
  w = draw(st.one_of(st.integers(-3, W + 3), st.integers(26, 31)))
  h = draw(st.one_of(st.integers(-3, H + 3), st.integers(26, 31)))
  return [x1, y1, x1 + w, y1 + h]


bbox_value = st.one_of(
    near_valid_box(),
    st.lists(coordinate, min_size=4, max_size=4),
    st.lists(coordinate, max_size=6),
    coordinate,
)

label_value = st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans())

dict_entry = st.one_of(
    st.builds(lambda b, l: {"bbox_2d": b, "label": l}, bbox_value, label_value),
    st.builds(lambda b: {"bbox_2d": b}, bbox_value),
    st.builds(
        lambda b, l: {"label": l, "bbox_2d": b, "extra": [1, {"x": 2}]}, bbox_value, label_value
    ),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
entry = st.one_of(
    dict_entry,
    near_valid_box(),
    st.lists(st.integers(0, 1000), min_size=4, max_size=4),
    st.integers(),
    st.text(max_size=5),
)

json_value = st.one_of(st.lists(entry, max_size=5), entry)
# Junk that cannot open a fence or a JSON candidate.
plain_junk = st.text(
    alphabet=st.characters(blacklist_characters="`[]{}", blacklist_categories=("Cs",)), max_size=40
)


def _dumps(value):
  return json.dumps(value, ensure_ascii=False)


def assert_consistent(result, width=W, height=H):
  """Invariants of any BBoxResult."""
  assert isinstance(result, parse.BBoxResult)
  assert isinstance(result.reason, BBoxReason)
  assert result.valid == (result.reason == BBoxReason.OK)
  if result.valid:
    assert follows_rules(result.box, width, height), result
  elif result.box is not None:
    # A well-formed box that was rejected must really break a rule.
    assert not follows_rules(result.box, width, height), result
  if result.box is None:
    assert result.reason in (
        BBoxReason.NO_JSON, BBoxReason.BAD_JSON, BBoxReason.NO_BBOX, BBoxReason.BAD_SHAPE,
        BBoxReason.NOT_INT, BBoxReason.BAD_LABEL,
    )
  assert result.label is None or isinstance(result.label, str)


# ---------------------------------------------------------------------------------------------
# Properties.


@MANY
@given(text=any_text, lenient=st.booleans(), skip_invalid=st.booleans(),
       width=st.integers(1, 3000), height=st.integers(1, 3000))
def test_never_raises_and_never_accepts_a_bad_box(text, lenient, skip_invalid, width, height):
  result = parse_bbox(text, width, height, lenient=lenient, skip_invalid=skip_invalid)
  assert_consistent(result, width, height)


@SOME
@given(value=json_value, prefix=plain_junk, suffix=any_text, lenient=st.booleans(),
       close=st.booleans())
def test_fenced_json_selects_first_well_formed_entry(value, prefix, suffix, lenient, close):
  body = _dumps(value)
  assume("```" not in body)  # A fence inside a label would end the block early.
  text = f"{prefix}```json\n{body}\n" + (f"```{suffix}" if close else "")
  result = parse_bbox(text, W, H, lenient=lenient)
  assert_consistent(result)
  expected = reference_select(value, lenient)
  if expected is None:
    assert result.box is None and not result.valid
    if isinstance(value, (dict, list)) and not value:
      assert result.reason == BBoxReason.NO_BBOX
  else:
    box, label = expected
    assert result.box == box
    assert result.label == label
    assert result.valid == follows_rules(box, W, H)


@SOME
@given(first=dict_entry, rest=st.lists(entry, max_size=4), prefix=plain_junk, suffix=plain_junk,
       lenient=st.booleans())
def test_bare_list_without_fence_matches_fenced(first, rest, prefix, suffix, lenient):
  # A bare list of objects is found like a fenced one (strict mode needs "[{" to start it).
  entries = [first] + rest
  assume("```" not in _dumps(entries))
  text = f"{prefix} {_dumps(entries)} {suffix}"
  assert parse_bbox(text, W, H, lenient=lenient) == parse_bbox(
      f"```json\n{_dumps(entries)}\n```", W, H, lenient=lenient
  )


@SOME
@given(value=json_value, cut=st.integers(0, 10**4), junk=any_text, lenient=st.booleans())
def test_truncated_and_mangled_json_never_raises(value, cut, junk, lenient):
  body = _dumps(value)
  for text in (
      "```json\n" + body[: cut % (len(body) + 1)],
      "```json\n" + body[: cut % (len(body) + 1)] + junk,
      junk + body[: cut % (len(body) + 1)],
      body.replace(",", junk[:3]),
  ):
    assert_consistent(parse_bbox(text, W, H, lenient=lenient))


@SOME
@given(before=st.lists(entry, max_size=3), after=st.lists(entry, max_size=3),
       x1=st.integers(0, 400), y1=st.integers(0, 300),
       w=st.integers(29, 400), h=st.integers(29, 300))
def test_skip_invalid_finds_first_valid_entry(before, after, x1, y1, w, h):
  good = {"bbox_2d": [x1, y1, x1 + w, y1 + h], "label": "target"}
  text = "```json\n" + _dumps(before + [good] + after) + "\n```"
  assume("```" not in text[7:-3])
  result = parse_bbox(text, W, H, skip_invalid=True)
  first_valid = next(
      (sel for e in before
       if (sel := reference_select([e])) is not None and follows_rules(sel[0], W, H)),
      None,
  )
  assert result.valid
  expected = first_valid or ((x1, y1, x1 + w, y1 + h), "target")
  assert (result.box, result.label) == expected


@MANY
@given(text=any_text)
def test_truncate_after_json_keeps_prefix_and_parse(text):
  cut = truncate_after_json(text)
  assert text.startswith(cut)
  assert truncate_after_json(cut) == cut
  end = parse.TURN1_STOP.end(text)
  if end is None:
    assert cut == text
  else:
    assert cut.endswith("```") and cut.count("```json") >= 1 and len(cut) == end
  # What is dropped never changes the parse.
  for lenient in (False, True):
    assert parse_bbox(cut, W, H, lenient=lenient) == parse_bbox(text, W, H, lenient=lenient)


# ---------------------------------------------------------------------------------------------
# Hand-written cases.


def _fenced(body):
  return f"Let me look at the sign.\n```json\n{body}\n```"


@pytest.mark.parametrize(
    "body, expected_box, valid, reason",
    [
        ('[{"bbox_2d": [100, 50, 400, 300], "label": "sign"}]', (100, 50, 400, 300), True, "ok"),
        # Touching the border is allowed (right/bottom are exclusive).
        ('[{"bbox_2d": [0, 0, 868, 644], "label": "all"}]', (0, 0, 868, 644), True, "ok"),
        ('[{"bbox_2d": [0, 0, 869, 644], "label": "x"}]', (0, 0, 869, 644), False, "out_of_bounds"),
        ('[{"bbox_2d": [0, -1, 100, 100], "label": "x"}]', (0, -1, 100, 100), False,
         "out_of_bounds"),
        ('[{"bbox_2d": [300, 50, 100, 300], "label": "x"}]', (300, 50, 100, 300), False,
         "not_ordered"),
        ('[{"bbox_2d": [10, 10, 10, 100], "label": "x"}]', (10, 10, 10, 100), False, "not_ordered"),
        # Sides must be > 28.
        ('[{"bbox_2d": [10, 10, 38, 100], "label": "x"}]', (10, 10, 38, 100), False, "too_small"),
        ('[{"bbox_2d": [10, 10, 39, 100], "label": "x"}]', (10, 10, 39, 100), True, "ok"),
        ('[{"bbox_2d": [10, 10, 100, 38], "label": "x"}]', (10, 10, 100, 38), False, "too_small"),
        # bools are not ints; 12.0 is not an int in strict mode.
        ('[{"bbox_2d": [true, 10, 100, 100], "label": "x"}]', None, False, "not_int"),
        ('[{"bbox_2d": [12.0, 10, 100, 100], "label": "x"}]', None, False, "not_int"),
        ('[{"bbox_2d": ["12", 10, 100, 100], "label": "x"}]', None, False, "not_int"),
        ('[{"bbox_2d": [10, 10, 100], "label": "x"}]', None, False, "bad_shape"),
        ('[{"bbox_2d": "10, 10, 100, 100", "label": "x"}]', None, False, "bad_shape"),
        ('[{"bbox_2d": [10, 10, 100, 100]}]', None, False, "bad_label"),
        ('[{"bbox_2d": [10, 10, 100, 100], "label": 7}]', None, False, "bad_label"),
        ('[{"point_2d": [10, 10], "label": "x"}]', None, False, "no_bbox"),
        ("[]", None, False, "no_bbox"),
        ("[[10, 10, 100, 100]]", None, False, "no_bbox"),
        ('[{"bbox_2d": [10, 10, 100, 100], "label": "x"', None, False, "bad_json"),
        ("not json at all", None, False, "bad_json"),
        ('[{"bbox_2d": [10, 10, 100, 100], "label": "x"}] trailing words', None, False, "bad_json"),
        # Huge and negative numbers are parsed but out of bounds.
        ('[{"bbox_2d": [0, 0, 99999999999999999999999, 100], "label": "x"}]',
         (0, 0, 99999999999999999999999, 100), False, "out_of_bounds"),
        # A lone object is one entry.
        ('{"bbox_2d": [100, 50, 400, 300], "label": "sign"}', (100, 50, 400, 300), True, "ok"),
        # First well-formed entry decides, even if invalid; broken entries before it are skipped.
        ('[{"bbox_2d": [1.5, 2, 3, 4], "label": "a"}, {"bbox_2d": [10, 10, 20, 20], "label": "b"},'
         ' {"bbox_2d": [100, 50, 400, 300], "label": "c"}]', (10, 10, 20, 20), False, "too_small"),
        ('[{"label": "a"}, {"bbox_2d": [100, 50, 400, 300], "label": "c"}]', (100, 50, 400, 300),
         True, "ok"),
    ],
)
def test_strict_table(body, expected_box, valid, reason):
  result = parse_bbox(_fenced(body), W, H)
  assert (result.box, result.valid, result.reason.value) == (expected_box, valid, reason)


def test_aspect_ratio_limit():
  # w / h == 100 exactly is rejected; just below is accepted.
  def parse_box(box, width, height):
    return parse_bbox(_fenced(json.dumps([{"bbox_2d": box, "label": "x"}])), width, height)

  assert parse_box([0, 0, 2900, 29], 3000, 100).reason == BBoxReason.ASPECT_RATIO
  assert parse_box([0, 0, 2899, 29], 3000, 100).valid
  assert parse_box([0, 0, 29, 2900], 100, 3000).reason == BBoxReason.ASPECT_RATIO
  assert parse_box([0, 0, 29, 2899], 100, 3000).valid


def test_label_and_first_valid_option():
  body = json.dumps([
      {"bbox_2d": [0, 0, 10, 10], "label": "tiny"},
      {"bbox_2d": [100, 50, 400, 300], "label": "sign"},
  ])
  assert parse_bbox(_fenced(body), W, H).box == (0, 0, 10, 10)
  result = parse_bbox(_fenced(body), W, H, skip_invalid=True)
  assert (result.box, result.valid, result.label) == ((100, 50, 400, 300), True, "sign")
  # No valid entry at all: the first failure is reported.
  body = '[{"bbox_2d": [0, 0, 10, 10], "label": "a"}, {"bbox_2d": [0, 0, 900, 10], "label": "b"}]'
  result = parse_bbox(_fenced(body), W, H, skip_invalid=True)
  assert (result.box, result.reason) == ((0, 0, 10, 10), BBoxReason.TOO_SMALL)


@pytest.mark.parametrize(
    "body, expected_box, valid",
    [
        ('[{"bbox_2d": [12.0, 10.4, 100.6, 100], "label": "x"}]', (12, 10, 101, 100), True),
        ('[{"bbox_2d": [12, 10, 100, 100]}]', (12, 10, 100, 100), True),  # label optional
        ("[12, 10, 100, 100]", (12, 10, 100, 100), True),  # bare box
        ("[[12, 10, 100, 100], [0, 0, 868, 644]]", (12, 10, 100, 100), True),
        ('[{"bbox_2d": [12, 10, 100, 100], "label": "x"}] trailing', (12, 10, 100, 100), True),
        ('[{"bbox_2d": [NaN, 10, 100, 100], "label": "x"}]', None, False),
        ('[{"bbox_2d": [Infinity, 10, 100, 100], "label": "x"}]', None, False),
        ('[{"bbox_2d": [1e999, 10, 100, 100], "label": "x"}]', None, False),
        ('[{"bbox_2d": [false, 10, 100, 100], "label": "x"}]', None, False),
    ],
)
def test_lenient_table(body, expected_box, valid):
  result = parse_bbox(_fenced(body), W, H, lenient=True)
  assert (result.box, result.valid) == (expected_box, valid)


def test_fences_and_bare_lists():
  good = '[{"bbox_2d": [100, 50, 400, 300], "label": "sign"}]'
  # Unclosed fence (stop string removed by the sampler) still parses.
  assert parse_bbox("```json\n" + good, W, H).valid
  # Only the first ```json block counts.
  two_blocks = "```json\n[oops\n```\n```json\n" + good + "\n```"
  assert parse_bbox(two_blocks, W, H).reason == BBoxReason.BAD_JSON
  # No fence: a bare list (Qwen's grounding output) is used; strict needs a list of objects.
  assert parse_bbox("The sign is at " + good + ".", W, H).box == (100, 50, 400, 300)
  assert parse_bbox("see [1] and [{}] then " + good, W, H).box == (100, 50, 400, 300)
  assert parse_bbox("at [100, 50, 400, 300]", W, H).reason == BBoxReason.NO_JSON
  assert parse_bbox("at [100, 50, 400, 300]", W, H, lenient=True).box == (100, 50, 400, 300)
  assert parse_bbox("[{]} " + good, W, H).valid
  assert parse_bbox("no json here", W, H).reason == BBoxReason.NO_JSON
  assert parse_bbox("", W, H).reason == BBoxReason.NO_JSON
  assert parse_bbox("only [{}] here", W, H).reason == BBoxReason.NO_BBOX
  # Other fences are not JSON fences; the list inside is found by the bare scan.
  assert parse_bbox("```python\n" + good + "\n```", W, H).valid
  # Text past max_chars is not scanned.
  assert parse_bbox("x" * 100 + good, W, H, max_chars=50).reason == BBoxReason.NO_JSON


@pytest.mark.parametrize("text", [None, b"```json []```", 12, ["a"]])
def test_non_string_text(text):
  assert parse_bbox(text, W, H).reason == BBoxReason.NO_JSON


@pytest.mark.parametrize("width, height", [(0, 10), (10, -1), (10.0, 10), (True, 10), ("10", 10)])
def test_bad_image_size_raises(width, height):
  with pytest.raises(ValueError, match="positive int"):
    parse_bbox("[]", width, height)


def test_truncate_after_json_cases():
  kept = 'I see it.\n```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]\n```'
  assert truncate_after_json(kept + "\nThen more text ```json") == kept
  assert truncate_after_json("no block") == "no block"
  assert truncate_after_json("```json\n[1, 2") == "```json\n[1, 2"
  # The opener's own backticks do not stop the turn; a fence before the opener does not either.
  assert parse.TURN1_STOP.end("```json") is None
  assert parse.TURN1_STOP.end("``` x ```json\n[]\n```") == len("``` x ```json\n[]\n```")
  assert (parse.TURN1_STOP.opener, parse.TURN1_STOP.stop) == ("```json", "```")


# ---------------------------------------------------------------------------------------------
# Linear time on adversarial input.

ADVERSARIAL = {
    "open_brackets": lambda n: "[" * n,
    "open_objects": lambda n: "[{" * (n // 2),
    "nested_bbox": lambda n: '[{"bbox_2d": ' * (n // 13),
    "fences": lambda n: "```json" * (n // 7),
    "fence_then_brackets": lambda n: "```json\n" + "[" * n,
    "unterminated_number_list": lambda n: "[" + "1," * (n // 2),
    "nested_number_lists": lambda n: "[1," * (n // 3),
    "quotes": lambda n: '["' * (n // 2),
    "objects_then_long_string": lambda n: '[{"a": ' * 40 + '"' + "x" * n,
    "objects_then_long_list": lambda n: '[{"a": ' * 40 + "[" + "1," * (n // 2),
}


def _best_time(fn, repeats=5):
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("lenient", [False, True])
def test_linear_time(name, lenient):
  n = 20_000
  small, large = ADVERSARIAL[name](n), ADVERSARIAL[name](4 * n)
  t_small = _best_time(lambda: parse_bbox(small, W, H, lenient=lenient))
  t_large = _best_time(lambda: parse_bbox(large, W, H, lenient=lenient))
  # Linear would give ~4x, quadratic ~16x; 1 ms of slack absorbs timer noise on tiny times.
  assert t_large < 10 * t_small + 1e-3, (t_small, t_large)
  assert t_large < 0.5
