"""Rewards on the final answer (protocol: 1.0 iff the last \\boxed{} matches, else 0.0).

There is no format reward and no grounding reward. Reward functions are registered by name:

    fn(final_text: str, sample: Mapping[str, Any]) -> float

where `sample` has at least "answer" (an option letter, or the answer text) and optionally
"choices" (option texts; letters A, B, C, ... in order).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mgpo_jax.rollout import prompts

RewardFn = Callable[[str, Mapping[str, Any]], float]

_BOXED = "\\boxed{"
# A backslash escape is consumed as a pair, so "\{" and "\}" do not count as braces, while the
# "{" of "\\{" (a LaTeX line break, then a brace) does.
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}`, with nested braces balanced; None if absent or unclosed.

  "Last" is the last opening `\\boxed{`, so `\\boxed{\\boxed{A}}` gives "A". Linear time; never
  raises.
  """
  if not isinstance(text, str):
    return None
  start = text.rfind(_BOXED)
  if start < 0:
    return None
  content_start = start + len(_BOXED)
  depth = 1
  for m in _BRACE_OR_ESCAPE.finditer(text, content_start):
    token = m.group()
    if token == "{":
      depth += 1
    elif token == "}":
      depth -= 1
      if depth == 0:
        return text[content_start : m.start()]
  return None


# Characters stripped from both ends of an answer (ASCII and full-width punctuation, brackets,
# quotes, markdown emphasis, math dollars). Not "-", "+", "%": they change a numeric answer.
_EDGE_CHARS = " \t\r\n.,;:!?()[]{}<>\"'`*_$“”‘’。，：；！？（）【】"
# Leading "." is kept (".5").
_LEADING_EDGE_CHARS = _EDGE_CHARS.replace(".", "")
# \text{B}, \textbf{B}, \mathrm{B} around the whole answer.
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{(.*)\}", re.DOTALL)
_MAX_UNWRAP = 4
# "Answer: B", "the answer is B", "Option B", "choice: B".
_ANSWER_PREFIX = re.compile(
    r"(?:the\s+)?(?:final\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*", re.IGNORECASE
)
# "B) blue", "B. blue", "(B) blue", "B: blue" (after edge stripping "(B)" is already "B").
_LETTER_THEN_TEXT = re.compile(r"\(?([A-Za-z])\s*[).:\]]\s*(.*)", re.DOTALL)


def _clean(s: str) -> str:
  """Unwraps LaTeX text commands, collapses whitespace and strips edge punctuation."""
  s = s.strip()
  for _ in range(_MAX_UNWRAP):  # Bounded, so nested wrappers cannot make this quadratic.
    m = _LATEX_WRAPPER.fullmatch(s)
    if m is None:
      break
    s = m.group(1).strip()
  s = " ".join(s.split())
  return s.lstrip(_LEADING_EDGE_CHARS).rstrip(_EDGE_CHARS)


def _free_form(s: str) -> str:
  return _clean(s).casefold()


def normalize_answer(s: str, choices: Sequence[str] | None = None) -> str:
  """Normalises an answer for exact matching.

  Always: LaTeX text wrappers removed, whitespace collapsed, edge punctuation / brackets / quotes
  stripped, case folded. With `choices`, an answer that names an option becomes its letter:
  "(B)", "B.", "b", "B) blue", "Answer: B" and the option text "blue" all give "B" (for
  choices ["red", "blue"]). An option letter wins over option text when both could apply.

  Raises:
    ValueError: if `s` is not a string or `choices` is malformed.
  """
  if not isinstance(s, str):
    raise ValueError(f"answer must be a string, got {s!r}")
  choices = prompts.validate_choices(choices)
  letters = prompts.option_letters(len(choices))
  cleaned = _clean(s)
  if not letters:
    return cleaned.casefold()

  candidates = [cleaned]
  m = _ANSWER_PREFIX.match(cleaned)
  if m is not None and m.end() < len(cleaned):
    candidates.append(_clean(cleaned[m.end():]))
  for cand in candidates:
    if len(cand) == 1 and cand.upper() in letters:
      return cand.upper()
    m = _LETTER_THEN_TEXT.fullmatch(cand)
    if m is not None and m.group(1).upper() in letters:
      return m.group(1).upper()

  # The option text itself; only if exactly one option has it.
  target = cleaned.casefold()
  hits = [
      l
      for l, c in zip(letters, choices)
      if _free_form(prompts.strip_option_prefix(c, l)) == target
  ]
  if len(hits) == 1:
    return hits[0]
  return target


def exact_match_reward(final_text: str, answer: str, choices: Sequence[str] | None = None) -> float:
  """1.0 if the last \\boxed{} of `final_text` normalises to the same as `answer`, else 0.0.

  Raises:
    ValueError: if `answer` normalises to nothing (a data bug, not a model error).
  """
  gold = normalize_answer(answer, choices)
  if not gold:
    raise ValueError(f"ground-truth answer {answer!r} is empty after normalisation")
  boxed = last_boxed(final_text)
  if boxed is None:
    return 0.0
  return 1.0 if normalize_answer(boxed, choices) == gold else 0.0


REWARD_FNS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
  """Decorator: registers a reward function under `name` (names are unique)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"reward name must be a non-empty string, got {name!r}")

  def decorator(fn: RewardFn) -> RewardFn:
    if name in REWARD_FNS:
      raise ValueError(f"reward {name!r} is already registered")
    REWARD_FNS[name] = fn
    return fn

  return decorator


def get_reward_fn(name: str) -> RewardFn:
  """The reward function registered as `name`."""
  try:
    return REWARD_FNS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown reward {name!r}; known rewards: {sorted(REWARD_FNS)}") from None


EXACT_MATCH = "exact_match"


@register_reward(EXACT_MATCH)
def exact_match(final_text: str, sample: Mapping[str, Any]) -> float:
  """The MGPO reward: exact match of the last \\boxed{} with sample["answer"]."""
  if "answer" not in sample:
    raise ValueError(f"exact_match needs sample['answer']; sample has keys {sorted(sample)}")
  return exact_match_reward(final_text, sample["answer"], sample.get("choices"))
