"""Qwen2.5-VL's chat format: its special tokens, its chat template, special ids and prompt rendering.

Light on purpose (no transformers import): the rollout engine and the config checks use it; building and
loading a tokenizer is `tokenizer.py`. Every function takes any tokenizer with Qwen2.5-VL's special
tokens (the real one or `tokenizer.build_tokenizer`'s).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

# Qwen2.5's added special tokens, in the relative order of the real tokenizer (ids 151643..151656 there;
# `tokenizer.build_tokenizer` appends them to its BPE vocabulary in this order).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# The chat template shipped with Qwen/Qwen2.5-VL-7B-Instruct (chat_template.json), verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens the rest of the project uses, read from a tokenizer."""

    im_start: int
    im_end: int
    endoftext: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    pad: int


def _single_token_id(tokenizer, vocab: Mapping[str, int], token: str) -> int:
    if token not in vocab:
        raise ValueError(f"Tokenizer has no special token {token!r}.")
    token_id = vocab[token]
    # A token only in the vocab (not registered as added/special) would be split by the pre-tokenizer.
    encoded = tokenizer.encode(token, add_special_tokens=False)
    if encoded != [token_id]:
        raise ValueError(f"Tokenizer does not encode {token!r} as the single id {token_id} (got {encoded}).")
    return token_id


def special_token_ids(tokenizer) -> SpecialTokens:
    """Reads the Qwen2.5-VL special token ids from `tokenizer`; ValueError naming any missing one."""
    vocab = tokenizer.get_vocab()
    if tokenizer.pad_token_id is None:
        raise ValueError("Tokenizer has no pad token (Qwen2.5-VL uses '<|endoftext|>').")
    ids = {
        name: _single_token_id(tokenizer, vocab, f"<|{name}|>")
        for name in ("im_start", "im_end", "endoftext", "vision_start", "vision_end", "image_pad", "video_pad")
    }
    return SpecialTokens(**ids, pad=tokenizer.pad_token_id)


def expand_image_pads(text: str, num_tokens_per_image: Sequence[int], image_pad: str = IMAGE_PAD) -> str:
    """Replaces the k-th `image_pad` in `text` with `num_tokens_per_image[k]` copies of it.

    This is what `Qwen2_5_VLProcessor` does with `t * h * w // merge_size**2` tokens per image. Linear in
    the output length.
    """
    if not image_pad:
        raise ValueError("image_pad must be a non-empty string.")
    counts = []
    for k, n in enumerate(num_tokens_per_image):
        try:
            n = operator.index(n)
        except TypeError:
            raise ValueError(f"num_tokens_per_image[{k}]={n!r} is not an integer.") from None
        if n < 1:
            raise ValueError(f"num_tokens_per_image[{k}]={n} must be >= 1.")
        counts.append(n)
    pieces = text.split(image_pad)
    if len(pieces) - 1 != len(counts):
        raise ValueError(
            f"Text has {len(pieces) - 1} {image_pad!r} placeholders but {len(counts)} image token counts were given."
        )
    out = [pieces[0]]
    for n, piece in zip(counts, pieces[1:]):
        out.append(image_pad * n)
        out.append(piece)
    return "".join(out)


def render_chat(
    tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    num_tokens_per_image: Sequence[int],
    num_tokens_per_video: Sequence[int] = (),
) -> list[int]:
    """Renders `messages` with the tokenizer's chat template, expands vision pads, and encodes.

    Args:
      tokenizer: a tokenizer with a Qwen2.5-VL chat template.
      messages: chat messages (`{"role": ..., "content": str | list[content item]}`).
      add_generation_prompt: append `<|im_start|>assistant\\n`.
      num_tokens_per_image: merged vision tokens per image, in order of appearance.
      num_tokens_per_video: same for videos.

    Returns:
      Token ids, with no special tokens added beyond those the template writes.
    """
    if tokenizer.chat_template is None:
        raise ValueError("Tokenizer has no chat template.")
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    text = expand_image_pads(text, num_tokens_per_image, image_pad=IMAGE_PAD)
    text = expand_image_pads(text, num_tokens_per_video, image_pad=VIDEO_PAD)
    return tokenizer.encode(text, add_special_tokens=False)
