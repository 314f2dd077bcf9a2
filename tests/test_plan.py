"""mgpo_jax/plan/memory.py (the logic of tools/plan.py): parameter counts against transformers (meta device), per-device bytes consistent with the
mesh, the documented fitting layouts fit, an impossible one does not, and AOT argument bytes == the plan's."""

import math
import os

import pytest
import torch
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from mgpo_jax.plan import memory as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_V5 = os.path.join(ROOT, "mgpo_jax", "configs", "tpu_v5.py")
HF_7B = os.path.join(ROOT, "tests", "data", "hf_configs", "qwen2_5_vl_7b")
GiB = 1024 ** 3

# The 7B layouts bench/README.md presents (the TPU compiler, via libtpu's deviceless topologies, accepted
# both with peaks of 51 GiB and 12 GiB): mesh, training rows per device, tokens and patches per row, prompts
# one host decodes together (rollouts are per host: mgpo_jax/experiment.py)
FITTING = {
    "v5p-16": dict(mesh=(1, 4, 2), micro_rows_per_device=1),  # full resolution: 2 x 5120 patches a row
    "v5e-64": dict(mesh=(1, 16, 4), micro_rows_per_device=1, seq_len=2048, patches_per_row=512,
                   sampling_prompts=2),
}


@pytest.fixture(scope="module")
def config():
  return plan_lib.load_config(TPU_V5)


@pytest.fixture(scope="module")
def model_7b(config):
  cfg, source = plan_lib.model_config(config)
  assert "qwen2_5_vl_7b" in source
  return cfg


def test_topologies():
  assert plan_lib.parse_topology("v5p-64")[1] == 32   # v5p counts TensorCores: 2 per chip
  assert plan_lib.parse_topology("v5p-16")[1] == 8
  assert plan_lib.parse_topology("v5e-64")[1] == 64   # v5e counts chips
  assert plan_lib.parse_topology("v4-32")[1] == 16
  with pytest.raises(ValueError, match="expected"):
    plan_lib.parse_topology("h100-8")


def test_7b_param_count_matches_transformers_meta_device(model_7b):
  hf_cfg = AutoConfig.from_pretrained(HF_7B)
  with torch.device("meta"):
    hf = Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg)
  ref = sum(p.numel() for p in hf.parameters())
  leaves = plan_lib.param_leaves(model_7b)
  ours = sum(math.prod(s) for _, s, _ in leaves)
  assert ours == ref
  assert round(ours / 1e9, 2) == 8.29


@pytest.mark.parametrize("topology", ["v5p-16", "v5e-64", "v5p-64"])
def test_per_device_bytes_consistent_with_mesh(config, model_7b, topology):
  chip, n = plan_lib.parse_topology(topology)
  over = FITTING.get(topology, {})
  s = plan_lib.setup_from_config(config, topology, **over)
  p = plan_lib.plan(model_7b, s, chip)
  total = p["params"]["count"] * 4
  assert p["params"]["total_f32_bytes"] == total
  # Only norms / biases / indivisible dims replicate: per-device bytes are total / devices within 1%.
  per = p["params"]["per_device_f32_bytes"]
  assert total / n <= per <= 1.01 * total / n
  t = p["training"]
  assert t["adam_moments_f32"] == 2 * t["params_f32"]
  assert t["reference"] == t["compute_copy"] == per // 2
  # The per-host sampler: tensor parallel over the host's 4 chips, so total bf16 bytes / 4 within 2%.
  tp = s.sampling_mesh[2]
  assert s.sampling_mesh == (1, 1, 4)
  sw = p["sampling"]["sampler_weights"]
  assert total / 2 / tp <= sw <= 1.02 * total / 2 / tp
  # KV cache: 28 layers x 4 kv heads x 128 x (K, V) x bf16 = 56 KiB per token, split over 'tensor'.
  assert p["sampling"]["kv_bytes_per_token"] == 56 * 1024 / tp
  st = p["sharding_tradeoff"]
  learner_shard = p["params"]["per_device_compute_bytes"]
  assert st["sampler_weights_per_device_fsdp_rules"] == learner_shard < sw
  assert st["reshard_bytes_in_per_device"] == sw - learner_shard
  # Decoding in the learner's layout would gather the other fsdp-1 shards at every step.
  assert st["fsdp_allgather_bytes_per_decode_step"] == learner_shard * (s.mesh[1] - 1)


def test_kv_bytes_match_the_configs_comments(config, model_7b):
  # configs/tpu_v5.py: "56 KiB a token, 14 KiB a chip with the 4 KV heads split", "~29 GiB a chip" for
  # 8 prompts x 8 samples per host at the 32k bucket.
  assert plan_lib.kv_cache_bytes_per_row(model_7b, 1, 1, 2) == 56 * 1024
  assert plan_lib.kv_cache_bytes_per_row(model_7b, 1, 4, 2) == 14 * 1024
  p = plan_lib.plan(model_7b, plan_lib.setup_from_config(config, "v5p-64"), plan_lib.CHIPS["v5p"])
  assert p["sampling"]["rows_per_device"] == 64 and p["sampling"]["kv_cache"] == 28 * GiB


@pytest.mark.parametrize("topology", sorted(FITTING))
def test_presented_7b_layouts_fit(config, model_7b, topology):
  chip, _ = plan_lib.parse_topology(topology)
  s = plan_lib.setup_from_config(config, topology, **FITTING[topology])
  p = plan_lib.plan(model_7b, s, chip)
  assert p["fits"], (p["training"]["total"] / GiB, p["sampling"]["total"] / GiB)
  assert s.remat and s.rows_per_device == FITTING[topology]["micro_rows_per_device"]
  # The same layout with full-resolution images (2 x 5120 patches) would not fit the earlier dense
  # [P, P] vision attention.
  big = plan_lib.setup_from_config(config, topology, **{**FITTING[topology], "patches_per_row": 10240,
                                                        "vision_impl": "dense"})
  assert big.patches_per_row == 10240
  assert not plan_lib.plan(model_7b, big, chip)["fits_training"]


def test_search_finds_a_v5e_64_layout(config, model_7b):
  found = plan_lib.search(config, "v5e-64", model_7b, patches_per_row=2048)
  assert found and all(p["fits"] for p in found)
  assert all(p["peak_bytes"] <= 0.9 * 16 * GiB for p in found)


def test_72b_on_v5e_8_without_fsdp_does_not_fit(config):
  cfg, _ = plan_lib.model_config(config, "qwen2_5_vl_72b")
  chip, _ = plan_lib.parse_topology("v5e-8")
  s = plan_lib.setup_from_config(config, "v5e-8", mesh=(8, 1, 1), micro_rows_per_device=1)
  p = plan_lib.plan(cfg, s, chip)
  assert not p["fits"] and not p["fits_training"]
  assert p["params"]["per_device_f32_bytes"] == p["params"]["total_f32_bytes"]  # fully replicated
  assert p["params"]["count"] > 70e9
  assert "fits: NO" in plan_lib.markdown(p)


def test_aot_arguments_equal_the_planned_state_bytes():
  """The tiny config's real Learner.update compiled for abstract inputs on 8 simulated devices: XLA's
  argument bytes are exactly the plan's params + Adam + reference + mini-batch (+ the small scalars)."""
  cfg_path = os.path.join(ROOT, "mgpo_jax", "configs", "cpu_tiny.py")
  config = plan_lib.load_config(cfg_path)
  cfg, _ = plan_lib.model_config(config)
  over = dict(mesh=(1, 4, 2), micro_rows_per_device=1, seq_len=256, patches_per_row=128)
  aot = plan_lib.aot_memory(cfg_path, "v5p-16", over, timeout_s=300)
  ma = aot["memory_analysis"]
  s = plan_lib.setup_from_config(config, "v5p-16", **over)
  p = plan_lib.plan(cfg, s, plan_lib.CHIPS["v5p"])
  t = p["training"]
  state = t["params_f32"] + t["adam_moments_f32"] + t["reference"]
  # Arguments: state + mini-batch inputs + (step, adam count, rewards, group ids, index): a few hundred bytes.
  assert state + t["minibatch_inputs"] <= ma["argument_size_in_bytes"] <= state + t["minibatch_inputs"] + 4096
  # The donated state comes back aliased in place.
  assert ma["alias_size_in_bytes"] >= t["params_f32"] + t["adam_moments_f32"]
