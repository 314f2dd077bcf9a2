"""Grading of a model's final answer against a multiple-choice sample.

Two graders, named by the protocol that uses them:

  mgpo    the MGPO reward: the content of the LAST \\boxed{...} (brace-matched), normalised (case,
          spaces, edge punctuation, \\text{}, "(B)", "B)", "Answer: B", an option's own text), must
          equal the answer letter. No box: wrong. "B. red" is read as the letter B. Exactly what
          `rollout.reward.exact_match` gives the trainer (a test checks this).
  direct  the single-turn protocol (base model, GRPO baseline): the last \\boxed{} when there is one
          (our single-turn prompt asks for it), otherwise lmms-eval's letter extraction
          (`extract_letter`): a leading letter ("B", "(B) red", "B. red"), "answer is X", "(X)",
          "X." inside the text, or a lone letter in any case ("b").
"""

from __future__ import annotations

import enum
import re
from typing import Any, Mapping, Sequence

from mgpo_jax.data import schema
from mgpo_jax.rollout import reward as reward_lib


class Grader(enum.StrEnum):
  MGPO = "mgpo"
  DIRECT = "direct"


def _letters(num_choices: int) -> str:
  return schema.OPTION_LETTERS[:num_choices]


def extract_letter(text: str, num_choices: int) -> str | None:
  """The option letter an lmms-eval multiple-choice parser reads from a short answer, or None.

  Tried in order (the first hit wins): the whole answer is one letter (any case, brackets and
  trailing punctuation allowed); the answer starts with a capital letter followed by a space,
  ".", ":" or ")"; "answer is X" / "answer: X"; the first "(X)"; the first "X." or "X:" at a word
  boundary. Letters beyond the options are ignored.
  """
  letters = _letters(num_choices)
  if not isinstance(text, str) or not letters:
    return None
  s = text.strip()
  cls = f"[{letters}]"
  patterns = (
      rf"^[\s(\[*]*({cls})[\s)\].:*]*$",              # "B", "(B)", "B.", "**B**"
      rf"^\(?({cls})(?:[\s.:)]|$)",                   # "B red", "(B) red", "B. red"
      rf"answer\s*(?:is)?\s*[:：]?\s*\(?({cls})\b",      # "The answer is C", "Answer: (C)"
      rf"\(({cls})\)",                                # "... (C) ..."
      rf"\b({cls})[.:]",                              # "... C. ..."
  )
  for i, p in enumerate(patterns):
    flags = re.IGNORECASE if i in (0, 2) else 0
    m = re.search(p, s, flags)
    if m is not None:
      return m.group(1).upper()
  return None


def grade(text: str, sample: Mapping[str, Any], grader: Grader | str) -> tuple[str | None, bool]:
  """(the prediction as read, whether it is the sample's answer) for the final turn's `text`.

  The prediction is an option letter when the answer names one, else the normalised boxed text;
  None when nothing could be read (no box for `mgpo`; no box and no letter for `direct`).
  """
  choices: Sequence[str] = sample.get(schema.CHOICES) or ()
  gold = reward_lib.normalize_answer(str(sample[schema.ANSWER]), choices)
  boxed = reward_lib.last_boxed(text)
  if boxed is not None:
    pred = reward_lib.normalize_answer(boxed, choices)
  elif Grader(grader) is Grader.DIRECT:
    pred = extract_letter(text, len(choices))
  else:
    pred = None
  return pred, pred is not None and pred == gold
