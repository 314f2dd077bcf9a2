"""Tests for mgpo_jax.rollout.prompts: the MGPO conversation as chat-template messages."""

import dataclasses

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mgpo_jax.rollout import parse, prompts
from mgpo_jax.rollout.prompts import (
    PromptConfig,
    followup_user_message,
    format_choices,
    single_turn_messages,
    turn1_messages,
)
from mgpo_jax.models.qwen2_5_vl.chat import QWEN2_5_VL_CHAT_TEMPLATE

CFG = PromptConfig()
Q = "What colour is the small car on the left?"
CHOICES = ["red", "blue", "green"]
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def _check_structure(messages):
  for message in messages:
    assert set(message) == {"role", "content"}
    assert message["role"] in ("system", "user", "assistant")
    for item in message["content"]:
      assert item["type"] in ("text", "image")
      if item["type"] == "text":
        assert set(item) == {"type", "text"} and isinstance(item["text"], str) and item["text"]
      else:
        assert item == {"type": "image"}


def _texts(message):
  return [item["text"] for item in message["content"] if item["type"] == "text"]


def _types(message):
  return [item["type"] for item in message["content"]]


def _render(messages, add_generation_prompt=True):
  return jinja2.Environment().from_string(QWEN2_5_VL_CHAT_TEMPLATE).render(
      messages=messages, add_generation_prompt=add_generation_prompt
  )


def test_format_choices():
  assert format_choices(["red", "blue"]) == "(A) red\n(B) blue"
  assert format_choices([" red ", "(B) blue", "C. green"]) == "(A) red\n(B) blue\n(C) green"
  # A prefix with the wrong letter is part of the option text.
  assert format_choices(["(B) x", "y"]) == "(A) (B) x\n(B) y"
  assert format_choices([]) == "" and format_choices(None) == ""
  assert format_choices(list("abcdefghij")).splitlines()[-1] == "(J) j"


@pytest.mark.parametrize(
    "choices, match", [("ab", "sequence"), ([1], "strings"), (["x"] * 11, "choices")]
)
def test_format_choices_errors(choices, match):
  with pytest.raises(ValueError, match=match):
    format_choices(choices)


def test_system_prompt_states_the_protocol():
  text = CFG.system_prompt
  for needle in ("image", "question", "coordinates", "JSON", '"bbox_2d": [x1, y1, x2, y2]', "crop",
                 "\\boxed{}", "letter"):
    assert needle in text, needle


def test_turn1_messages():
  messages = turn1_messages(Q, CHOICES, CFG)
  _check_structure(messages)
  assert [m["role"] for m in messages] == ["system", "user"]
  assert _texts(messages[0]) == [CFG.system_prompt]
  user = messages[1]
  assert _types(user) == ["image", "text"]
  text = _texts(user)[0]
  assert text.startswith(Q)
  assert '```json\n[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]\n```' in text
  assert "absolute pixel" in text
  # The paper shows the options only in the answer turn.
  assert "(A) red" not in text and "\\boxed" not in text
  shown = turn1_messages(Q, CHOICES, dataclasses.replace(CFG, options_in_grounding_turns=True))
  assert "(A) red\n(B) blue\n(C) green" in _texts(shown[1])[0]


def test_followup_valid_box():
  message = followup_user_message(Q, CHOICES, (100, 50, 400, 300), True, CFG)
  _check_structure([message])
  assert message["role"] == "user"
  assert _types(message) == ["text", "image", "text"]
  intro, tail = _texts(message)
  assert "[100, 50, 400, 300]" in intro and "sub-image" in intro
  assert tail.startswith(f"Question: {Q}\nOptions:\n(A) red\n(B) blue\n(C) green\n")
  assert "original image" in tail and "sub-image" in tail and "not enough" in tail
  assert "\\boxed{}" in tail


def test_followup_invalid_box():
  for box in (None, (0, 0, 5, 5)):
    message = followup_user_message(Q, CHOICES, box, False, CFG)
    _check_structure([message])
    assert _types(message) == ["text", "image", "text"]
    intro, tail = _texts(message)
    assert "missing or invalid" in intro and "original image" in intro
    assert "[0, 0, 5, 5]" not in intro
    assert tail.startswith(f"Question: {Q}\nOptions:\n(A) red")
    assert "\\boxed{}" in tail and "sub-image" not in tail


def test_followup_intermediate_turn_asks_for_another_region():
  message = followup_user_message(Q, CHOICES, (100, 50, 400, 300), True, CFG, is_last_turn=False)
  _check_structure([message])
  intro, tail = _texts(message)
  assert "[100, 50, 400, 300]" in intro
  assert f"Question: {Q}" in tail and "coordinates" in tail and "another" in tail
  assert "\\boxed" not in tail and "(A) red" not in tail
  last = followup_user_message(Q, CHOICES, (100, 50, 400, 300), True, CFG, is_last_turn=True)
  assert _texts(last)[1] != tail


def test_followup_errors():
  with pytest.raises(ValueError, match="needs the box"):
    followup_user_message(Q, CHOICES, None, True, CFG)
  with pytest.raises(ValueError, match="question"):
    followup_user_message("  ", CHOICES, None, False, CFG)
  with pytest.raises(ValueError, match="choices"):
    followup_user_message(Q, ["x"] * 11, None, False, CFG, is_last_turn=False)


def test_open_question_without_choices():
  message = followup_user_message(Q, None, (100, 50, 400, 300), True, CFG)
  tail = _texts(message)[1]
  assert "Options" not in tail and "letter" not in tail and "\\boxed{}" in tail
  single = single_turn_messages(Q, [], CFG)
  assert "Options" not in _texts(single[1])[0]


def test_single_turn_messages():
  messages = single_turn_messages(Q, CHOICES, CFG)
  _check_structure(messages)
  assert [m["role"] for m in messages] == ["system", "user"]
  assert _texts(messages[0]) == ["You are a helpful assistant."]
  assert _types(messages[1]) == ["image", "text"]
  text = _texts(messages[1])[0]
  assert text.startswith(f"Question: {Q}\nOptions:\n(A) red\n(B) blue\n(C) green\n")
  assert "\\boxed{}" in text and "bbox_2d" not in text


def test_image_items_are_fresh_dicts():
  a = turn1_messages(Q, CHOICES, CFG)[1]["content"][0]
  b = turn1_messages(Q, CHOICES, CFG)[1]["content"][0]
  a["image"] = "attached"
  assert b == {"type": "image"}


def test_full_conversation_renders_with_qwen_template():
  turn1 = (
      'The car is at the left.\n```json\n[{"bbox_2d": [100, 50, 400, 300], "label": "car"}]\n```'
  )
  result = parse.parse_bbox(turn1, 868, 644)
  messages = turn1_messages(Q, CHOICES, CFG) + [
      {"role": "assistant", "content": [{"type": "text", "text": turn1}]},
      followup_user_message(Q, CHOICES, result.box, result.valid, CFG),
  ]
  rendered = _render(messages)
  assert rendered.count(VISION) == 2
  assert rendered.startswith("<|im_start|>system\n" + CFG.system_prompt + "<|im_end|>\n")
  assert f"<|im_start|>user\n{VISION}{Q}\n" in rendered
  assert f"<|im_start|>assistant\n{turn1}<|im_end|>\n" in rendered
  assert "is returned below:" + VISION + "Question: " in rendered
  assert rendered.endswith("<|im_start|>assistant\n")
  # Order: system, image 1, question, model box, crop, options.
  needles = (
      "<|im_start|>system", VISION, Q, "<|im_start|>assistant\nThe car", "[100, 50, 400, 300] is",
      "(A) red",
  )
  order = [rendered.index(s) for s in needles]
  assert order == sorted(order)
  assert order[-2] < rendered.rindex(VISION) < order[-1]


@settings(max_examples=200, deadline=None, database=None)
@given(question=st.text(min_size=1, max_size=40).filter(str.strip),
       choices=st.lists(st.text(max_size=10), max_size=5))
def test_any_text_is_passed_through(question, choices):
  # Questions with braces or placeholder names stay literal.
  question = question + " {bbox} {options} {question} {}"
  for messages in (
      turn1_messages(question, choices, CFG),
      single_turn_messages(question, choices, CFG),
      [followup_user_message(question, choices, (1, 2, 300, 400), True, CFG)],
      [followup_user_message(question, choices, None, False, CFG, is_last_turn=False)],
  ):
    _check_structure(messages)
    assert question in "".join(t for m in messages for t in _texts(m))
    assert sum(_types(m).count("image") for m in messages) == 1
  tail = _texts(followup_user_message(question, choices, (1, 2, 300, 400), True, CFG))[1]
  assert format_choices(choices) in tail


def test_prompt_config():
  with pytest.raises(dataclasses.FrozenInstanceError):
    CFG.system_prompt = "x"  # type: ignore[misc]
  with pytest.raises(ValueError, match="crop_intro_template"):
    PromptConfig(crop_intro_template="no placeholder here")
  with pytest.raises(ValueError, match="question_template"):
    PromptConfig(question_template="Q:")
  custom = PromptConfig(
      crop_intro_template='Zoom on {bbox} ({"bbox_2d": {bbox}}):',
      question_template="Q: {question} (answer in \\boxed{})",
  )
  message = followup_user_message("why?", ["a", "b"], (1, 2, 30, 40), True, custom)
  # Only the known placeholders are filled; other braces stay literal.
  assert _texts(message)[0] == 'Zoom on [1, 2, 30, 40] ({"bbox_2d": [1, 2, 30, 40]}):'
  assert _texts(message)[1].startswith("Q: why? (answer in \\boxed{})\nOptions:\n(A) a\n(B) b\n")


def test_option_letters():
  assert prompts.option_letters(0) == ""
  assert prompts.option_letters(4) == "ABCD"
  with pytest.raises(ValueError):
    prompts.option_letters(11)


def test_prompt_styles():
  short = prompts.prompt_style("short")
  assert prompts.prompt_style("paper") == prompts.PromptConfig()
  msg = prompts.followup_user_message("Q?", ["a", "b"], (1, 2, 30, 40), True, short)
  tail = msg["content"][2]["text"]
  assert tail.endswith("Answer with the letter in \\boxed{}.") and "  " not in tail  # empty analyse text dropped
  assert len(short.system_prompt) < len(prompts.PromptConfig().system_prompt) // 4
  with pytest.raises(ValueError, match="unknown prompt style"):
    prompts.prompt_style("long")
