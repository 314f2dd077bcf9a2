"""Tests for mgpo_jax.models.qwen2_5_vl.tokenizer and .chat: the offline Qwen2.5-VL-style tokenizer and chat rendering."""

import dataclasses
import json
import os
import shutil

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mgpo_jax.models.qwen2_5_vl import chat
from mgpo_jax.models.qwen2_5_vl import tokenizer as tok_lib
from mgpo_jax.models.qwen2_5_vl.chat import SPECIAL_TOKENS
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig

SPECIALS = list(SPECIAL_TOKENS)
P = "<|image_pad|>"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok_lib.build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_build_returns_reloaded_tokenizer(tmp_path):
    t = tok_lib.build_tokenizer(tmp_path)
    assert isinstance(t, PreTrainedTokenizerFast)
    assert t.name_or_path == str(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))


def test_vocab_layout_and_special_order(tok):
    # 512 BPE tokens (the default corpus is rich enough to fill them), then the 14 specials in Qwen's order.
    assert len(tok) == 512 + 14
    assert [tok.convert_tokens_to_ids(s) for s in SPECIALS] == list(range(512, 526))
    for s in SPECIALS:
        assert len(tok.encode(s, add_special_tokens=False)) == 1
        assert len(tok.encode(f"a{s}b", add_special_tokens=False)) == 3
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    # The order is Qwen's: the released ids (151643 = <|endoftext|>) of the tokens the model config names.
    qwen = Qwen25VLConfig()
    first = qwen.bos_token_id
    for token, qwen_id in (("<|im_end|>", qwen.eos_token_id), ("<|vision_start|>", qwen.vision_start_token_id),
                           ("<|vision_end|>", qwen.vision_end_token_id), ("<|image_pad|>", qwen.image_token_id),
                           ("<|video_pad|>", qwen.video_token_id)):
        assert SPECIALS.index(token) == qwen_id - first
    assert tok.bos_token is None
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)


def test_special_token_ids(tok):
    ids = chat.special_token_ids(tok)
    c = tok.convert_tokens_to_ids
    assert ids == chat.SpecialTokens(
        im_start=c("<|im_start|>"),
        im_end=c("<|im_end|>"),
        endoftext=c("<|endoftext|>"),
        vision_start=c("<|vision_start|>"),
        vision_end=c("<|vision_end|>"),
        image_pad=c("<|image_pad|>"),
        video_pad=c("<|video_pad|>"),
        pad=c("<|endoftext|>"),
    )
    assert ids.im_end == tok.eos_token_id
    assert len(set(dataclasses.astuple(ids))) == 7  # all distinct except pad == endoftext
    with pytest.raises(dataclasses.FrozenInstanceError):
        ids.pad = 0


def _tiny_tokenizer(specials, pad):
    t = tokenizers.Tokenizer(tokenizers.models.BPE())
    t.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = tokenizers.decoders.ByteLevel()
    t.train_from_iterator(
        ["abc"],
        tokenizers.trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    t.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token=pad)


def test_special_token_ids_missing_token_named():
    specials = [s for s in SPECIALS if s != "<|vision_end|>"]
    with pytest.raises(ValueError, match=r"<\|vision_end\|>"):
        chat.special_token_ids(_tiny_tokenizer(specials, pad="<|endoftext|>"))


def test_special_token_ids_missing_pad():
    with pytest.raises(ValueError, match="pad"):
        chat.special_token_ids(_tiny_tokenizer(SPECIALS, pad=None))


_PIECES = st.sampled_from(
    SPECIALS + ["\\boxed{B}", "```json\n", '[{"bbox_2d": [12, 34, 56, 78], "label": "cat"}]', " ", "\n", "\t",
                "(A) red", "日本語", "e\u0301", "\u00e9", "🙂", "  \n\n ", "0123456789", "'s", " .", " ,", " n't"]
)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_random_unicode(tok, s):
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=12).map("".join))
def test_round_trip_structured(tok, s):
    ids = tok.encode(s, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == s


def test_round_trip_examples(tok):
    for s in ["", " ", "\n\n", "The answer is \\boxed{B}.", "ÀÉÎ ü ß 中文 😀", "e\u0301 (not NFC)",
              "no clean-up: a . b , c ! d ? do n't it 's we 're",
              '```json\n[\n\t{"bbox_2d": [12, 34, 56, 78], "label": "cat"}\n]\n```']:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_chat_template_two_turn_multimodal(tok):
    messages = [
        {"role": "system", "content": "You are MGPO."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the cat holding?"}]},
        {"role": "assistant", "content": '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]\n```'},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Here is the crop:"},
                {"image": "file:///tmp/crop.png"},
                {"type": "text", "text": "Answer with \\boxed{}."},
            ],
        },
    ]
    expected = (
        "<|im_start|>system\nYou are MGPO.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is the cat holding?<|im_end|>\n"
        '<|im_start|>assistant\n```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}]\n```<|im_end|>\n'
        "<|im_start|>user\nHere is the crop:<|vision_start|><|image_pad|><|vision_end|>"
        "Answer with \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == expected[: -len("<|im_start|>assistant\n")]


def test_chat_template_default_system_and_vision_ids(tok):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    two_images = [{"role": "user", "content": [{"type": "image"}, {"type": "image_url", "image_url": "u"}]}]
    assert tok.apply_chat_template(two_images, tokenize=False, add_vision_id=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    )


def test_expand_image_pads():
    assert chat.expand_image_pads(f"a{P}b{P}c", [2, 3]) == f"a{P}{P}b{P}{P}{P}c"
    assert chat.expand_image_pads(f"{P}{P}", [1, 2]) == P * 3
    assert chat.expand_image_pads("no images", []) == "no images"
    assert chat.expand_image_pads("x<V>y", [4], image_pad="<V>") == "x<V><V><V><V>y"


@given(st.lists(st.text(alphabet="ab<|>_\n", max_size=6), min_size=1, max_size=6), st.data())
def test_expand_image_pads_counts(pieces, data):
    text = P.join(pieces)
    n_images = text.count(P)
    counts = data.draw(st.lists(st.integers(1, 50), min_size=n_images, max_size=n_images))
    out = chat.expand_image_pads(text, counts)
    assert out.count(P) == sum(counts)
    assert out.replace(P, "") == text.replace(P, "")


@pytest.mark.parametrize(
    "text,counts,match",
    [
        (f"a{P}b", [], "1 '<\\|image_pad\\|>' placeholders but 0"),
        (f"a{P}b", [1, 2], "1 '<\\|image_pad\\|>' placeholders but 2"),
        ("ab", [3], "0 '<\\|image_pad\\|>' placeholders but 1"),
        (f"a{P}b", [0], "must be >= 1"),
        (f"a{P}b", [1.5], "not an integer"),
    ],
)
def test_expand_image_pads_errors(text, counts, match):
    with pytest.raises(ValueError, match=match):
        chat.expand_image_pads(text, counts)


def test_render_chat(tok):
    ids_cfg = chat.special_token_ids(tok)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]},
        {"role": "assistant", "content": "There."},
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}]},
    ]
    ids = chat.render_chat(
        tok, messages, add_generation_prompt=True, num_tokens_per_image=[4, 6], num_tokens_per_video=[3]
    )
    assert ids.count(ids_cfg.image_pad) == 10
    assert ids.count(ids_cfg.video_pad) == 3
    assert ids.count(ids_cfg.vision_start) == 3
    assert ids[0] == ids_cfg.im_start
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{P * 4}<|vision_end|>Where?<|im_end|>\n"
        "<|im_start|>assistant\nThere.<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{P * 6}<|vision_end|>"
        f"<|vision_start|>{'<|video_pad|>' * 3}<|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The first image's block is contiguous: vision_start, 4 pads, vision_end.
    i = ids.index(ids_cfg.vision_start)
    assert ids[i : i + 6] == [ids_cfg.vision_start] + [ids_cfg.image_pad] * 4 + [ids_cfg.vision_end]


def test_render_chat_large_and_text_only(tok):
    ids_cfg = chat.special_token_ids(tok)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]
    ids = chat.render_chat(tok, messages, add_generation_prompt=False, num_tokens_per_image=[20000, 12345])
    assert ids.count(ids_cfg.image_pad) == 32345
    text_only = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    ids = chat.render_chat(tok, text_only, add_generation_prompt=False, num_tokens_per_image=[])
    assert tok.decode(ids) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"


def test_render_chat_count_mismatch(tok):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    with pytest.raises(ValueError, match="placeholders"):
        chat.render_chat(tok, messages, add_generation_prompt=True, num_tokens_per_image=[])


def test_reload_paths_agree(tok_dir, tok):
    loaded = tok_lib.load_tokenizer(tok_dir)
    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    sample = "Question: (A) red (B) blue\n\\boxed{A} <|im_end|> 中文"
    for t in (loaded, auto):
        assert t.encode(sample, add_special_tokens=False) == tok.encode(sample, add_special_tokens=False)
        assert t.chat_template == chat.QWEN2_5_VL_CHAT_TEMPLATE
        assert (t.eos_token_id, t.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_load_tokenizer_errors_and_processor_template(tmp_path, tok_dir):
    with pytest.raises(ValueError, match="does not exist"):
        tok_lib.load_tokenizer(tmp_path / "missing")
    # A checkpoint whose template only lives in the processor's chat_template.json.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tok_dir, ckpt)
    os.remove(ckpt / "chat_template.jinja")
    (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'T' }}"}))
    assert tok_lib.load_tokenizer(ckpt).chat_template == "{{ 'T' }}"


def test_deterministic(tmp_path, tok_dir):
    tok_lib.build_tokenizer(tmp_path / "a")
    tok_lib.build_tokenizer(tmp_path / "b")
    reference = (tok_dir / "tokenizer.json").read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == reference
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == reference


def test_custom_corpus_and_vocab_size(tmp_path):
    t = tok_lib.build_tokenizer(tmp_path / "c", vocab_size=300, corpus=["zebra zebra zebra"] * 10)
    assert t.convert_tokens_to_ids("<|endoftext|>") <= 300  # specials follow the (possibly short) BPE vocab
    assert t.convert_ids_to_tokens(t.encode(" zebra", add_special_tokens=False)) == ["Ġzebra"]
    with pytest.raises(ValueError, match="vocab_size"):
        tok_lib.build_tokenizer(tmp_path / "d", vocab_size=100)
    with pytest.raises(ValueError, match="corpus"):
        tok_lib.build_tokenizer(tmp_path / "e", corpus=[b"bytes"])
