"""MGPO prompts as HF chat-template messages (protocol steps 1, 2 and 5).

Conversation (2 turns by default; more turns repeat the grounding step)::

    system     PromptConfig.system_prompt                                  turn1_messages
    user       <image> question, "output the key region as ```json [...]```"
    assistant  ... ```json [{"bbox_2d": [x1, y1, x2, y2], "label": "..."}] ```  (sampled)
    user       "sub-image of [x1, y1, x2, y2]:" <crop>                     followup_user_message
               "Question: ...", options, "analyse ..., answer in \\boxed{}"
               (invalid box: "coordinates missing or invalid, original image:" <original> ...)
    assistant  ... \\boxed{B}                                                   (sampled)

Messages are lists of {"role": ..., "content": [{"type": "text", "text": ...} | {"type": "image"}]},
which Qwen2.5-VL's chat template renders with one <|vision_start|><|image_pad|><|vision_end|> per
image item, in order. Templates fill `{question}`, `{options}` and `{bbox}` only; any other braces
(the JSON example, \\boxed{}) are left as they are.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from mgpo_jax.data.schema import OPTION_LETTERS

Message = dict[str, Any]

_SYSTEM_PROMPT = (
    "You are a helpful assistant that answers questions about images. You are given an image and "
    "a question about it. First, find the region of the image that matters most for answering the "
    "question, and output its coordinates as JSON at the end of your reply, in this format:\n"
    "```json\n"
    '[{"bbox_2d": [x1, y1, x2, y2], "label": "a short description of the region"}]\n'
    "```\n"
    "The coordinates are absolute pixel positions in the image as it is given to you: (x1, y1) is "
    "the top-left corner and (x2, y2) the bottom-right corner of the region. Stop right after the "
    "JSON. The system will then crop this region from the image, enlarge it and show it to you. "
    "Once you have seen the enlarged region, answer the question and put your final answer "
    "(the letter of the correct option) inside \\boxed{}."
)

_GROUNDING_REQUEST = (
    "Output the coordinates of the image region that is key to answering the question, in JSON "
    'format: ```json\n[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]\n```\n'
    "Use absolute pixel coordinates of the image as given."
)


def _join_lines(*parts: str) -> str:
  return "\n".join(p for p in parts if p)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """System prompt and turn templates (defaults follow the MGPO paper's conversation).

  Attributes:
    system_prompt: the MGPO system message.
    turn1_question_template: the question in turn 1; `{question}`.
    grounding_request: turn-1 request for the key region's coordinates.
    options_in_grounding_turns: also list the options in turns that ask for a box (the paper shows
      them only in the answer turn).
    crop_intro_template: text before the crop image when the box is valid; `{bbox}`.
    invalid_box_intro: text before the original image when the box is missing or invalid.
    question_template: the question in answer turns and intermediate turns; `{question}`.
    options_template: the options block; `{options}` is `format_choices(choices)`.
    analyse_crop: answer-turn instruction after a valid box.
    analyse_original: answer-turn instruction after an invalid box (no sub-image was shown).
    answer_format_choices: how to give the answer when there are options.
    answer_format_open: how to give the answer when there are none.
    regrounding_request: intermediate turns (max_turns > 2): ask for another region.
    single_turn_system_prompt: system message of the single-turn GRPO baseline (Qwen's default);
      its user message is the image, then question, options and answer format as in an answer
      turn.
  """

  system_prompt: str = _SYSTEM_PROMPT
  turn1_question_template: str = "{question}"
  grounding_request: str = _GROUNDING_REQUEST
  options_in_grounding_turns: bool = False
  crop_intro_template: str = "The sub-image for the coordinates {bbox} is returned below:"
  invalid_box_intro: str = (
      "The coordinates of the region were missing or invalid, so the original image is returned "
      "instead:"
  )
  question_template: str = "Question: {question}"
  options_template: str = "Options:\n{options}"
  analyse_crop: str = (
      "Please analyse the question using both the original image and the enlarged sub-image. If "
      "the sub-image is not enough to answer, rely on the original image."
  )
  analyse_original: str = "Please analyse the question using the original image."
  answer_format_choices: str = (
      "Give the letter of the correct option as your final answer inside \\boxed{}."
  )
  answer_format_open: str = "Give your final answer inside \\boxed{}."
  regrounding_request: str = (
      "If you need to look closer, output the coordinates of another image region that is key to "
      "answering the question, in the same JSON format, with absolute pixel coordinates of the "
      "first image."
  )
  single_turn_system_prompt: str = "You are a helpful assistant."

  def __post_init__(self):
    required = {
        "turn1_question_template": "{question}",
        "crop_intro_template": "{bbox}",
        "question_template": "{question}",
        "options_template": "{options}",
    }
    for field, placeholder in required.items():
      value = getattr(self, field)
      if not isinstance(value, str) or placeholder not in value:
        raise ValueError(
            f"PromptConfig.{field} must be a string containing {placeholder}, got {value!r}"
        )


_PLACEHOLDER = re.compile(r"\{(question|options|bbox)\}")


def _fill(template: str, **fields: str) -> str:
  """Fills known placeholders in one pass (a question containing "{bbox}" stays literal)."""
  return _PLACEHOLDER.sub(lambda m: fields.get(m.group(1), ""), template)


def option_letters(num_choices: int) -> str:
  """The option letters "A", "B", ... of `num_choices` options."""
  if not 0 <= num_choices <= len(OPTION_LETTERS):
    raise ValueError(
        f"between 0 and {len(OPTION_LETTERS)} choices are supported, got {num_choices}"
    )
  return OPTION_LETTERS[:num_choices]


_OPTION_PREFIX = re.compile(r"\s*\(?([A-Za-z])\s*[).:]\s+")


def strip_option_prefix(text: str, letter: str) -> str:
  """Drops a leading "(B) " / "B. " / "B) " from an option text whose letter is `letter`.

  Data sets such as MME-RealWorld store options with their letters; ours are kept without.
  """
  m = _OPTION_PREFIX.match(text)
  if m is not None and m.group(1).upper() == letter:
    return text[m.end():]
  return text


def validate_choices(choices: Sequence[str] | None) -> list[str]:
  """`choices` as a list of option texts ([] for None); ValueError if malformed or too many."""
  if choices is None:
    return []
  if isinstance(choices, str):
    raise ValueError(f"choices must be a sequence of option texts, not the string {choices!r}")
  choices = list(choices)
  if not all(isinstance(c, str) for c in choices):
    raise ValueError(f"choices must all be strings, got {choices!r}")
  option_letters(len(choices))  # Checks the count.
  return choices


def format_choices(choices: Sequence[str] | None) -> str:
  """'(A) red\\n(B) blue' for ["red", "blue"]; '' for no choices."""
  choices = validate_choices(choices)
  letters = option_letters(len(choices))
  return "\n".join(
      f"({l}) {strip_option_prefix(c, l).strip()}" for l, c in zip(letters, choices)
  )


def format_bbox(box: Sequence[int]) -> str:
  """'[x1, y1, x2, y2]', as the model writes it."""
  return "[" + ", ".join(str(int(v)) for v in box) + "]"


def _check_question(question: str) -> None:
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"question must be a non-empty string, got {question!r}")


def _text(text: str) -> dict[str, str]:
  return {"type": "text", "text": text}


def _image() -> dict[str, str]:
  # A fresh dict each time: callers may attach the PIL image to it.
  return {"type": "image"}


def _question_block(question: str, choices: Sequence[str] | None, cfg: PromptConfig) -> str:
  options = format_choices(choices)
  return _join_lines(
      _fill(cfg.question_template, question=question),
      _fill(cfg.options_template, options=options) if options else "",
  )


def turn1_messages(
    question: str, choices: Sequence[str] | None, cfg: PromptConfig
) -> list[Message]:
  """System prompt + the turn-1 user message (image, question, request for the key region)."""
  _check_question(question)
  options = format_choices(choices) if cfg.options_in_grounding_turns else ""
  text = _join_lines(
      _fill(cfg.turn1_question_template, question=question),
      _fill(cfg.options_template, options=options) if options else "",
      cfg.grounding_request,
  )
  return [
      {"role": "system", "content": [_text(cfg.system_prompt)]},
      {"role": "user", "content": [_image(), _text(text)]},
  ]


def followup_user_message(
    question: str,
    choices: Sequence[str] | None,
    box: Sequence[int] | None,
    valid: bool,
    cfg: PromptConfig,
    is_last_turn: bool = True,
) -> Message:
  """The user message after a grounding turn: the crop (valid box) or the original (invalid).

  Its single image item stands for the crop of the original when `valid`, else for the original
  image again; the caller supplies that image.

  Args:
    question: the question.
    choices: option texts (letters A, B, ... in order), or None for an open question.
    box: the parsed box in input pixels (required when `valid`).
    valid: whether the box passed `parse.check_box`.
    cfg: the prompts.
    is_last_turn: ask for the final answer; otherwise (max_turns > 2) ask for another region.
  """
  _check_question(question)
  if valid:
    if box is None:
      raise ValueError("followup_user_message: valid=True needs the box")
    intro = _fill(cfg.crop_intro_template, bbox=format_bbox(box))
  else:
    intro = cfg.invalid_box_intro
  if is_last_turn:
    analyse = cfg.analyse_crop if valid else cfg.analyse_original
    answer_format = cfg.answer_format_choices if choices else cfg.answer_format_open
    tail = _join_lines(_question_block(question, choices, cfg), " ".join(t for t in (analyse, answer_format) if t))
  else:
    format_choices(choices)  # Same checks whether or not the options are shown.
    shown = choices if cfg.options_in_grounding_turns else None
    tail = _join_lines(_question_block(question, shown, cfg), cfg.regrounding_request)
  return {"role": "user", "content": [_text(intro), _image(), _text(tail)]}


def single_turn_messages(
    question: str, choices: Sequence[str] | None, cfg: PromptConfig
) -> list[Message]:
  """The single-turn GRPO baseline: image, question and options, answer in \\boxed{}."""
  _check_question(question)
  answer_format = cfg.answer_format_choices if choices else cfg.answer_format_open
  text = _join_lines(_question_block(question, choices, cfg), answer_format)
  return [
      {"role": "system", "content": [_text(cfg.single_turn_system_prompt)]},
      {"role": "user", "content": [_image(), _text(text)]},
  ]


# Prompt styles a config can pick by name (`rollout.prompt_style`). "short" keeps the conversation's
# structure (turns, images, JSON box, \boxed{} answer) with terse texts: a model trained from scratch
# only needs them as fixed markers, and they are a quarter of the tokens of the paper's.
PROMPT_STYLES: dict[str, PromptConfig] = {
    "paper": PromptConfig(),
    "short": PromptConfig(
        system_prompt="Find the key region, output it as JSON, then answer in \\boxed{}.",
        grounding_request='Key region as ```json [{"bbox_2d": [x1, y1, x2, y2], "label": "..."}] ```',
        crop_intro_template="Region {bbox}:",
        invalid_box_intro="Invalid region; the original image:",
        analyse_crop="",
        analyse_original="",
        answer_format_choices="Answer with the letter in \\boxed{}.",
        answer_format_open="Answer in \\boxed{}.",
        regrounding_request="Another key region as JSON, or the same.",
    ),
}


def prompt_style(name: str) -> PromptConfig:
  if name not in PROMPT_STYLES:
    raise ValueError(f"unknown prompt style {name!r}; known: {sorted(PROMPT_STYLES)}")
  return PROMPT_STYLES[name]
