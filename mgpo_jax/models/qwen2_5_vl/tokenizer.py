"""The tokenizer: a local Qwen2.5-VL-style one built offline, or the checkpoint's own, loaded from disk.

Why a locally built tokenizer: tests and the CPU quick start must run with no network, so they may not
download Qwen's tokenizer from a hub. `build_tokenizer` trains a tiny byte-level BPE (same pre-tokenizer
and decoder as Qwen2's) and gives it Qwen2.5-VL's special tokens, in Qwen's order, and Qwen2.5-VL's real
chat template, so that everything downstream (prompt rendering, image-pad expansion, special-id lookups,
stop tokens) runs exactly as with the real one, only with a smaller vocabulary.

Real runs load the real tokenizer from the HF checkpoint directory with `load_tokenizer(hf_dir)`, i.e.
`AutoTokenizer.from_pretrained(hf_dir)` restricted to local files. Nothing in this module hard-codes a token id. The special tokens, the chat template and rendering
are `chat.py` (which needs no transformers).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator

import tokenizers
from tokenizers import decoders, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mgpo_jax.models.qwen2_5_vl.chat import EOS_TOKEN, PAD_TOKEN, QWEN2_5_VL_CHAT_TEMPLATE, SPECIAL_TOKENS

# Qwen2's pre-tokenization regex (from its tokenizer.json): single digits, letter runs, punctuation runs.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Byte-level BPE starts from the 256 byte symbols; fewer than that cannot encode every string.
_NUM_BYTE_SYMBOLS = 256
_QWEN_MODEL_MAX_LENGTH = 131072


def default_corpus() -> Iterator[str]:
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
    texts = list(default_corpus() if corpus is None else corpus)
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
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
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


def build_tokenizer_once(path: str | os.PathLike[str], vocab_size: int = 512,
                         corpus: Iterable[str] | None = None) -> None:
    """`build_tokenizer` into `path` unless a tokenizer is already there.

    Built into a temporary sibling and renamed, so a killed build never leaves a half-written tokenizer
    (the build is deterministic: concurrent builders write the same files).
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    build_tokenizer(tmp, vocab_size=vocab_size, corpus=corpus)
    os.replace(tmp, path)


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
