"""Text tokens for MGPO: a local Qwen2.5-VL-style tokenizer, special ids, and chat rendering.

Why a locally built tokenizer: tests and the CPU quick start must run with no network, so they may not
download Qwen's tokenizer from a hub. `build_tokenizer` trains a tiny byte-level BPE (same pre-tokenizer
and decoder as Qwen2's) and gives it Qwen2.5-VL's special tokens, in Qwen's order, and Qwen2.5-VL's real
chat template, so that everything downstream (prompt rendering, image-pad expansion, special-id lookups,
stop tokens) runs exactly as with the real one, only with a smaller vocabulary.

Real runs load the real tokenizer from the HF checkpoint directory with `load_tokenizer(hf_dir)`, i.e.
`AutoTokenizer.from_pretrained(hf_dir)` restricted to local files. Nothing in this module hard-codes a token id.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Qwen2.5's added special tokens, in the relative order of the real tokenizer (ids 151643..151656 there).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
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

# Qwen2's pre-tokenization regex (from its tokenizer.json): single digits, letter runs, punctuation runs.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

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

# Byte-level BPE starts from the 256 byte symbols; fewer than that cannot encode every string.
_NUM_BYTE_SYMBOLS = 256
_QWEN_MODEL_MAX_LENGTH = 131072


def _default_corpus() -> Iterator[str]:
    """Yields a small, fixed corpus shaped like MGPO prompts and Qwen2.5-VL outputs."""
    objects = ("cat", "dog", "person", "car", "sign", "umbrella", "bottle", "clock")
    colors = ("red", "blue", "green", "yellow", "white", "black")
    letters = "ABCD"
    yield "You are a helpful assistant."
    for i, (obj, color) in enumerate(itertools.product(objects, colors)):
        options = " ".join(f"({l}) {c}" for l, c in zip(letters, colors[i % 3 :]))
        yield (
            f"What is the color of the {obj} in the image? {options}\n"
            "Answer with the option's letter from the given choices directly."
        )
        x1, y1 = (37 * i) % 900, (53 * i + 11) % 700
        box = [x1, y1, x1 + 17 + i, y1 + 29 + 2 * i]
        yield (
            f"Locate the {obj} in the image and output its bbox coordinates in JSON format.\n"
            f'```json\n[\n\t{{"bbox_2d": {json.dumps(box)}, "label": "{obj}"}}\n]\n```'
        )
        yield f'[{{"bbox_2d": {json.dumps(box)}, "label": "{color} {obj}"}}]'
        answer = letters[i % 4]
        yield (
            f"<think>The {obj} is {color}, so the answer is option {answer}.</think>\n"
            f"The answer is \\boxed{{{answer}}}."
        )
    yield (
        "First, find the region of the image that is most relevant to the question and output the "
        "grounding coordinates of that region in JSON format. Then answer the question based on the "
        "original image and the cropped region. Put your final answer within \\boxed{}."
    )
    yield "The cropped region of the image is shown below. Please answer the question."
    yield " ".join(str(n) for n in range(0, 1000, 7))
    yield "Total: 3.14, 42, 2025-01-31, 100%, 1e-3; x = (a + b) / 2 != y"


def build_tokenizer(
    out_dir: str | os.PathLike[str],
    vocab_size: int = 512,
    corpus: Iterable[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Trains a tiny Qwen2-style byte-level BPE with Qwen2.5-VL's special tokens and chat template.

    Args:
      out_dir: directory the tokenizer is saved to (`save_pretrained`); created if missing.
      vocab_size: maximum size of the BPE vocabulary (bytes + merges), before the 14 special tokens.
      corpus: training strings; defaults to a built-in corpus of MGPO-like prompts and answers.

    Returns:
      The tokenizer reloaded from `out_dir` with `AutoTokenizer.from_pretrained`. Same inputs give a
      byte-identical `tokenizer.json`.
    """
    if vocab_size < _NUM_BYTE_SYMBOLS:
        raise ValueError(
            f"vocab_size={vocab_size} is below the {_NUM_BYTE_SYMBOLS} byte symbols a byte-level BPE needs."
        )
    texts = list(_default_corpus() if corpus is None else corpus)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("corpus must be an iterable of str.")

    # No NFC normalizer (Qwen2 has one): we want decode(encode(s)) == s for every string, byte for byte.
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],  # added afterwards so they come after the BPE vocab, as in Qwen.
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # as Qwen2: decoding must not edit spaces.
        model_max_length=_QWEN_MODEL_MAX_LENGTH,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(os.fspath(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path_or_dir: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Loads a tokenizer from a local directory (an HF checkpoint dir or `build_tokenizer`'s out_dir).

    Never touches the network. If the tokenizer files carry no chat template but the directory has the
    processor's `chat_template.json` (as some Qwen2.5-VL checkpoints do), that template is used.
    """
    path = os.fspath(path_or_dir)
    if not os.path.isdir(path):
        raise ValueError(f"Tokenizer directory {path!r} does not exist (hub ids are not loaded: no network).")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    processor_template = os.path.join(path, "chat_template.json")
    if tokenizer.chat_template is None and os.path.isfile(processor_template):
        with open(processor_template, encoding="utf-8") as f:
            tokenizer.chat_template = json.load(f)["chat_template"]
    return tokenizer


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


def _single_token_id(tokenizer: PreTrainedTokenizerBase, vocab: Mapping[str, int], token: str) -> int:
    if token not in vocab:
        raise ValueError(f"Tokenizer has no special token {token!r}.")
    token_id = vocab[token]
    # A token only in the vocab (not registered as added/special) would be split by the pre-tokenizer.
    encoded = tokenizer.encode(token, add_special_tokens=False)
    if encoded != [token_id]:
        raise ValueError(f"Tokenizer does not encode {token!r} as the single id {token_id} (got {encoded}).")
    return token_id


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
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
    tokenizer: PreTrainedTokenizerBase,
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
