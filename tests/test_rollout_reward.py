"""Tests for mgpo_jax.rollout.reward: \\boxed{} extraction, answer normalisation, registry."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mgpo_jax.rollout import reward
from mgpo_jax.rollout.reward import exact_match_reward, last_boxed, normalize_answer

PROPERTY = settings(max_examples=500, deadline=None, database=None)
CHOICES = ["red", "blue", "green", "dark blue"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is \\boxed{B}.", "B"),
        ("\\boxed{A} first, then \\boxed{C}", "C"),  # the last one
        ("\\boxed{\\text{B}}", "\\text{B}"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
        ("\\boxed{}", ""),
        ("\\boxed{ B }", " B "),
        ("\\boxed{\\boxed{A}}", "A"),  # the last opening \boxed{
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("\\boxed{x \\} y}", "x \\} y"),
        ("\\boxed{\\{1}", "\\{1"),
        ("\\boxed{a\\\\}b}", "a\\\\"),  # "\\" is an escaped backslash, so the brace after it counts
        ("\\boxed{A} and \\boxed{B", None),  # last one unclosed
        ("\\boxed{{A}", None),
        ("no box here", None),
        ("\\boxed A", None),
        ("boxed{A}", None),
        ("", None),
        ("\\boxed{A}}}}", "A"),
        ("}}}\\boxed{A}", "A"),
        ("\\boxed{é 车 😀}", "é 车 😀"),
    ],
)
def test_last_boxed_table(text, expected):
  assert last_boxed(text) == expected


@pytest.mark.parametrize("text", [None, 5, b"\\boxed{A}"])
def test_last_boxed_non_string(text):
  assert last_boxed(text) is None


def _text_without(chars, max_size):
  return st.text(
      alphabet=st.characters(blacklist_characters=chars, blacklist_categories=("Cs",)),
      max_size=max_size,
  )


balanced = st.recursive(
    _text_without("{}\\", 6),
    lambda inner: st.lists(inner, max_size=3).map(lambda parts: "{" + "".join(parts) + "}"),
    max_leaves=10,
)
any_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(["\\boxed{", "{", "}", "\\", "\\{", "\\}", "A", " ", "\\boxed"]),
             max_size=40).map("".join),
)


@PROPERTY
@given(prefix=any_text, content=st.lists(balanced, max_size=4).map("".join),
       suffix=_text_without("\\", 30))
def test_last_boxed_finds_balanced_content(prefix, content, suffix):
  # Whatever comes before, the last \boxed{} with balanced content is returned exactly.
  assert last_boxed(f"{prefix}\\boxed{{{content}}}{suffix}") == content


@PROPERTY
@given(text=any_text, choices=st.one_of(st.none(), st.lists(st.text(max_size=8), max_size=10)),
       answer=st.text(max_size=10))
def test_never_raises_on_model_text(text, choices, answer):
  boxed = last_boxed(text)
  assert boxed is None or (isinstance(boxed, str) and f"\\boxed{{{boxed}}}" in text)
  normalize_answer(text, choices)
  if normalize_answer(answer, choices):
    assert exact_match_reward(text, answer, choices) in (0.0, 1.0)


@pytest.mark.parametrize(
    "s, expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("(b)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("  B  ", "B"),
        ("B) blue", "B"),
        ("(B) blue", "B"),
        ("B. blue", "B"),
        ("B: blue", "B"),
        ("blue", "B"),
        ("Blue.", "B"),
        ("  BLUE ", "B"),
        ("dark   blue", "D"),  # whitespace collapsed, then option text
        ("\\text{B}", "B"),
        ("\\textbf{(C)}", "C"),
        ("$B$", "B"),
        ("**C**", "C"),
        ("Answer: B", "B"),
        ("The answer is (D) dark blue", "D"),
        ("Option A", "A"),
        ("purple", "purple"),  # not an option: free-form
        ("E", "e"),  # not one of the 4 letters
        ("", ""),
    ],
)
def test_normalize_multiple_choice(s, expected):
  assert normalize_answer(s, CHOICES) == expected


@pytest.mark.parametrize(
    "s, expected",
    [
        ("B", "b"),
        ("(B)", "b"),
        ("  Hello   World. ", "hello world"),
        ("'yes'", "yes"),
        ("-5", "-5"),  # minus kept
        ("3.5%", "3.5%"),
        (".5", ".5"),  # leading dot kept
        ("\\text{ Two }", "two"),
    ],
)
def test_normalize_free_form(s, expected):
  assert normalize_answer(s) == expected


def test_normalize_prefixed_and_ambiguous_choices():
  # Options stored with their letters (as in MME-RealWorld) still map by text.
  assert normalize_answer("blue", ["(A) red", "(B) blue"]) == "B"
  # The same text twice: no unique option, stays free-form.
  assert normalize_answer("red", ["red", "Red"]) == "red"
  # Letters win over option texts that look like letters.
  assert normalize_answer("B", ["B", "C"]) == "B"


@pytest.mark.parametrize(
    "choices, match",
    [("red", "sequence"), ([1, 2], "strings"), (["x"] * 11, "choices")],
)
def test_normalize_bad_choices(choices, match):
  with pytest.raises(ValueError, match=match):
    normalize_answer("A", choices)


@pytest.mark.parametrize(
    "final_text, answer, choices, expected",
    [
        ("It is blue. \\boxed{B}", "B", CHOICES, 1.0),
        ("\\boxed{(B) blue}", "B", CHOICES, 1.0),
        ("\\boxed{blue}", "B", CHOICES, 1.0),
        ("\\boxed{b}", "B", CHOICES, 1.0),
        ("\\boxed{\\text{B}}", "B", CHOICES, 1.0),
        ("\\boxed{A}", "B", CHOICES, 0.0),
        ("\\boxed{B} no wait \\boxed{A}", "B", CHOICES, 0.0),  # last box counts
        ("\\boxed{A} no wait \\boxed{B}", "B", CHOICES, 1.0),
        ("The answer is B", "B", CHOICES, 0.0),  # no box, no reward
        ("\\boxed{}", "B", CHOICES, 0.0),
        ("\\boxed{B", "B", CHOICES, 0.0),
        ("\\boxed{AB}", "A", CHOICES, 0.0),
        ("\\boxed{blue}", "blue", CHOICES, 1.0),  # answer given as option text
        ("\\boxed{ 42. }", "42", None, 1.0),
        ("\\boxed{43}", "42", None, 0.0),
    ],
)
def test_exact_match_reward(final_text, answer, choices, expected):
  assert exact_match_reward(final_text, answer, choices) == expected


@pytest.mark.parametrize("answer", ["", "  ", "()", None])
def test_exact_match_bad_answer(answer):
  with pytest.raises(ValueError, match="answer"):
    exact_match_reward("\\boxed{}", answer, CHOICES)


def test_registry():
  fn = reward.get_reward_fn(reward.EXACT_MATCH)
  assert fn is reward.REWARD_FNS["exact_match"]
  sample = {"answer": "C", "choices": CHOICES, "question": "q"}
  assert fn("\\boxed{green}", sample) == 1.0
  assert fn("\\boxed{C}", {"answer": "c"}) == 1.0  # choices optional
  with pytest.raises(ValueError, match="answer"):
    fn("\\boxed{C}", {"choices": CHOICES})


def test_registry_errors(monkeypatch):
  monkeypatch.setattr(reward, "REWARD_FNS", dict(reward.REWARD_FNS))
  with pytest.raises(ValueError, match=r"unknown reward 'nope'; known rewards: \['exact_match'\]"):
    reward.get_reward_fn("nope")
  with pytest.raises(ValueError, match="already registered"):
    reward.register_reward("exact_match")(lambda text, sample: 0.0)
  with pytest.raises(ValueError, match="non-empty string"):
    reward.register_reward("")

  @reward.register_reward("always_one")
  def always_one(final_text, sample):
    return 1.0

  assert reward.get_reward_fn("always_one") is always_one
  with pytest.raises(ValueError, match=r"\['always_one', 'exact_match'\]"):
    reward.get_reward_fn("missing")


def _best_time(fn, repeats=5):
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


ADVERSARIAL = {
    "boxed_openers": lambda n: "\\boxed{" * (n // 7),
    "boxed_then_open_braces": lambda n: "\\boxed{" + "{" * n,
    "boxed_each_with_brace": lambda n: "\\boxed{{" * (n // 8),
    "escapes": lambda n: "\\boxed{" + "\\{" * (n // 2),
    "nested_text_wrappers": lambda n: "\\text{" * (n // 6) + "}" * (n // 6),
    "letter_paren_runs": lambda n: "(" * n + "B" + ")" * n,
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_linear_time(name):
  n = 20_000
  small, large = ADVERSARIAL[name](n), ADVERSARIAL[name](4 * n)

  def run(text):
    last_boxed(text)
    normalize_answer(text, CHOICES)

  t_small = _best_time(lambda: run(small))
  t_large = _best_time(lambda: run(large))
  assert t_large < 10 * t_small + 1e-3, (t_small, t_large)
  assert t_large < 0.5
