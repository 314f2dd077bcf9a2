"""Released sizes (3B, 7B, 32B, 72B): our key set and shapes equal transformers', without allocating."""

import json
import os

import jax
import pytest
import torch
from flax import nnx
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from mgpo_jax.io import checkpoint as ckpt_io
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig

CONFIGS = os.path.join(os.path.dirname(__file__), "data", "hf_configs")
SIZES = ("qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b", "qwen2_5_vl_72b")
# Independent facts about the releases (model cards / porting notes), not read from our code:
# (hidden, layers, heads, kv heads, mlp, vocab, tied, billions of parameters as published).
RELEASED = {
    "qwen2_5_vl_3b": (2048, 36, 16, 2, 11008, 151936, True, 3.75),
    "qwen2_5_vl_7b": (3584, 28, 28, 4, 18944, 152064, False, 8.29),
    "qwen2_5_vl_32b": (5120, 64, 40, 8, 27648, 152064, False, 33.5),
    "qwen2_5_vl_72b": (8192, 80, 64, 8, 29568, 152064, False, 73.4),
}


def meta_hf_shapes(hf_dir):
  """transformers' state dict on the meta device, in the released flat layout (tied lm_head dropped)."""
  hf_cfg = AutoConfig.from_pretrained(hf_dir)
  with torch.device("meta"):
    model = Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg)
  shapes = {params_lib.canonical_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
  if hf_cfg.tie_word_embeddings:  # save_pretrained drops the tied copy; it must really be the same tensor
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    del shapes["lm_head.weight"]
  return shapes


@pytest.mark.parametrize("name", SIZES)
def test_released_config_parses_to_the_named_size(name):
  path = os.path.join(CONFIGS, name)
  cfg = Qwen25VLConfig.from_pretrained(path)
  assert cfg == getattr(Qwen25VLConfig, name)()
  D, L, N, K, F, V, tied, _ = RELEASED[name]
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
          cfg.vocab_size, cfg.tie_word_embeddings) == (D, L, N, K, F, V, tied)
  v = cfg.vision
  assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size) == (32, 1280, 16, 3420, D)
  assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.mrope_section) == (1e-6, 1e6, (16, 24, 24))
  with open(os.path.join(path, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("name", SIZES)
def test_shapes_match_transformers_on_meta_device(name):
  path = os.path.join(CONFIGS, name)
  cfg = Qwen25VLConfig.from_pretrained(path)
  ref = meta_hf_shapes(path)
  ours = params_lib.hf_shapes(cfg)
  assert sorted(ours) == sorted(ref)
  assert {k: ours[k] for k in ref} == ref
  # Published sizes (rounded): a typo in a config or in our table shows up here too.
  assert abs(params_lib.num_params(cfg) / 1e9 - RELEASED[name][7]) < 0.06

  # jax.eval_shape of our model: every HF tensor maps onto its parameter (transposes/reshapes included),
  # one layer per key of a stacked parameter, and every parameter is covered.
  _, abs_state = nnx.split(params_lib.abstract_model(cfg))
  abstract = nnx.to_pure_dict(abs_state)
  covered = set()
  for rule in params_lib.active_rules(cfg):
    ours_shape = tuple(params_lib._get_path(abstract, rule.ours).shape)
    keys = params_lib.hf_keys(rule, cfg)
    layer_shape = ours_shape[1:] if rule.stacked else ours_shape
    if rule.stacked:
      assert ours_shape[0] == len(keys), rule.ours
    for key in keys:
      got = jax.eval_shape(lambda w: params_lib.hf_to_ours(rule, w, layer_shape),
                           jax.ShapeDtypeStruct(ref[key], jax.numpy.bfloat16))
      assert tuple(got.shape) == layer_shape, key
    covered.add(rule.ours)
  flat = ckpt_io.flatten(abstract)
  assert covered == set(flat)
