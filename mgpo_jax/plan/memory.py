"""Memory plan of an MGPO experiment config on a TPU slice, without allocating any real array.

The command line is `tools/plan.py`:

  python tools/plan.py --config=tpu_v5 --topology=v5p-64
  python tools/plan.py --config=tpu_v5 --topology=v5e-64 --search       # fitting layouts
  python tools/plan.py --config=tpu_v5 --topology=v5p-16 --mesh=1,4,2 --micro_rows_per_device=1 --aot

For the model the config names (e.g. the real Qwen2.5-VL-7B) on the configured mesh, per device:

  training  f32 master params, f32 gradient accumulator, AdamW moments (2 x f32), the bf16 compute copy
            and the bf16 reference (all with `mgpo_jax.sharding.RULES`), FSDP-gathered layer weights,
            activations of one micro-batch (decoder layers with/without remat, the vision tower, the
            chunked vocabulary projection)
  sampling  the train state (it stays resident) + the sampler's bf16 weights (`SAMPLING_RULES`:
            tensor-parallel, replicated over data/fsdp) + the KV cache of the rows a device decodes

and whether the peak fits the chip's HBM (v4 32 GiB, v5e 16 GiB, v5p 95 GiB; "fits" keeps 10% for the
runtime). Parameter bytes are exact per leaf (the same `logical_to_spec` the learner uses, on an
AbstractMesh); activations are an analytic estimate of what the CURRENT implementation keeps (dense
attention with materialised [T, T] scores in the decoder; the vision tower's chunked attention, so never
[P, P], and per-block remat with `model.remat`). `--aot` lowers the real `Learner.update` for abstract inputs on a simulated CPU mesh
(XLA_FLAGS=--xla_force_host_platform_device_count=<chips>, in a subprocess) and reports XLA's
`compile().memory_analysis()`: arguments (the state) are exact; temp bytes come from the CPU backend's
buffer assignment, a proxy for the TPU's.

Sampling vs training sharding: bytes of sampler weights per device under each table, the one-off
resharding (all-gather over 'fsdp') when the sampler takes new weights, and the all-gather bytes per
decoded token if the sampler kept the FSDP (training) layout instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import AbstractMesh

from mgpo_jax import config as cs
from mgpo_jax.config import files as config_files
from mgpo_jax.learner import Learner, LearnerConfig, Precision, TrainState
from mgpo_jax.models.qwen2_5_vl.params import abstract_model
from mgpo_jax.models.qwen2_5_vl.vision import VisionInputs
from mgpo_jax.parallel import sharding as shd
from mgpo_jax.rl.batch import TrainBatch

GiB = 1024 ** 3
HEADROOM = 0.9  # fraction of HBM the plan may use (runtime, fragmentation, program buffers)
CHIPS_PER_HOST = 4  # v4, v5p and multi-host v5e slices: 4 chips per TPU VM host
VISION_CHUNK = 512  # mgpo_jax.models.qwen2_5_vl.vision.ATTENTION_CHUNK
BF16, F32 = 2, 4


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int
  cores_per_chip: int    # TensorCores per chip: topology names count cores for v4 / v5p, chips for v5e
  bf16_flops: float      # peak dense bf16 FLOP/s per chip
  ici_bytes_s: float     # per-chip ICI bandwidth (all links, one direction)


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 2, 275e12, 6 * 50e9),
    "v5e": Chip("v5e", 16 * GiB, 1, 197e12, 4 * 50e9),
    "v5p": Chip("v5p", 95 * GiB, 2, 459e12, 6 * 100e9),
}


def parse_topology(topology: str) -> tuple[Chip, int]:
  """'v5p-64' -> (v5p, 32 chips); 'v5e-64' -> (v5e, 64 chips); 'v4-32' -> (v4, 16 chips)."""
  m = re.fullmatch(r"(v4|v5e|v5p|v5litepod)-(\d+)", topology.strip().lower())
  if not m:
    raise ValueError(f"topology {topology!r}: expected <generation>-<size> with generation in "
                     f"{sorted(CHIPS)} (e.g. v5p-64, v5e-64, v4-32)")
  chip = CHIPS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
  n = int(m.group(2))
  if n % chip.cores_per_chip:
    raise ValueError(f"topology {topology!r}: {n} is not a multiple of {chip.cores_per_chip} cores per chip")
  return chip, n // chip.cores_per_chip


# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------


def load_config(path: str):
  """The ConfigDict of an experiment file or a packaged config's name (`tpu_v5`, `tpu_v5`)."""
  return config_files.load_config_file(config_files.resolve_config_path(path))


def model_config(config, model: str = ""):
  """(Qwen25VLConfig, where it came from). `model` overrides with a released size name."""
  if model:
    if model not in cs.NAMED_SIZES:
      raise ValueError(f"--model={model!r}: known sizes {sorted(cs.NAMED_SIZES)}")
    return cs.NAMED_SIZES[model](), f"--model={model}"
  m = config.model
  if m.size != cs.SIZE_FROM_HF:
    return cs.model_config(config), f"model.size={m.size}"
  if os.path.isfile(os.path.join(m.hf_dir, "config.json")):
    return cs.model_config(config), f"{m.hf_dir}/config.json"
  # The checkpoint lives on the TPU hosts; its folder name says which release it is.
  hit = re.search(r"(\d+)B", os.path.basename(m.hf_dir.rstrip("/")))
  name = f"qwen2_5_vl_{hit.group(1).lower()}b" if hit else ""
  if name not in cs.NAMED_SIZES:
    raise ValueError(f"model.hf_dir={m.hf_dir!r} is not on this machine and its name does not say "
                     f"the size; pass --model (one of {sorted(cs.NAMED_SIZES)})")
  return cs.NAMED_SIZES[name](), f"released {name} (named by model.hf_dir={m.hf_dir!r})"


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the plan depends on (from the config, overridable on the command line)."""

  topology: str
  num_chips: int
  mesh: tuple[int, int, int]            # training ('data', 'fsdp', 'tensor'), all chips
  sampling_mesh: tuple[int, int, int]   # ONE host's sampler, over its local chips
  sampling_rules: str                   # "sampling" or "training"
  micro_rows: int                       # rows per micro-batch, all devices
  mini_rows: int                        # rows per optimizer update
  seq_len: int                          # tokens per training row (its whole conversation, prompt included)
  patches_per_row: int                  # vision patches per training row (all its images)
  remat: bool
  compute_bytes: int                    # bf16 = 2, f32 = 4
  logprob_chunk: int
  sampling_rows: int                    # rows one host decodes together
  cache_len: int                        # KV cache slots per row
  # "chunked": the current vision tower (`vision.chunked_attention`: query chunks of 512 patches
  # scored against a band of keys in window blocks / the row's keys in full blocks, each chunk
  # rematerialised; blocks rematerialised with `remat`); "dense": the earlier [P, P] masked attention
  # in every block without remat, kept for comparison.
  vision_impl: str = "chunked"
  # The learner's shared-prefix layout (`rl.batch`): of each row's `seq_len` tokens / `patches_per_row`
  # patches, its prompt (minus its last token) and the prompt's image are a prefix that `group_rows` rows
  # share (1: every row its own copy, `rl.share_prefix=False`); the rest is the row's continuation.
  prefix_len: int = 1
  prefix_patches: int = 0
  group_rows: int = 1

  @property
  def dp(self) -> int:
    return self.mesh[0] * self.mesh[1]

  @property
  def rows_per_device(self) -> int:
    return self.micro_rows // self.dp

  @property
  def continuation_len(self) -> int:
    return self.seq_len - self.prefix_len

  @property
  def continuation_patches(self) -> int:
    return self.patches_per_row - self.prefix_patches

  @property
  def prefixes_per_device(self) -> int:
    """Prefix slots per device per micro-batch, as `Learner.split_rollout` lays them out for groups of
    `group_rows` consecutive rows: the distinct groups of a device's rows, rounded up to a power of two."""
    rows, g = self.rows_per_device, self.group_rows
    if g <= 1:
      return rows
    distinct = rows // g if rows % g == 0 else 1 if g % rows == 0 else min(-(-rows // g) + 1, rows)
    return min(1 << (distinct - 1).bit_length(), rows)


def setup_from_config(config, topology: str, *, mesh: Sequence[int] | None = None,
                      micro_rows_per_device: int | None = None, seq_len: int | None = None,
                      patches_per_row: int | None = None, remat: bool | None = None,
                      cache_len: int | None = None, sampling_prompts: int | None = None,
                      vision_impl: str = "chunked", sampling_mesh: Sequence[int] | None = None,
                      share_prefix: bool | None = None, prefix_len: int | None = None,
                      prefix_patches: int | None = None) -> Setup:
  """Rollouts are process-local (mgpo_jax/experiment.py): each host decodes `rollout.sampling_batch_size`
  prompts x `num_generations` with its own bfloat16 copy of the policy on its CHIPS_PER_HOST chips
  (`mesh.sampling_shape`, default (1, 1, -1): tensor parallel over them)."""
  chip, n = parse_topology(topology)
  shape = shd.resolve_mesh_shape(tuple(mesh) if mesh else config.mesh.shape, n)
  local = min(CHIPS_PER_HOST, n)
  s_shape = shd.resolve_mesh_shape(tuple(sampling_mesh or config.mesh.sampling_shape or (1, 1, -1)), local)
  gens = config.rollout.num_generations
  dp = shape[0] * shape[1]
  micro = micro_rows_per_device * dp if micro_rows_per_device else config.rl.micro_batch_size * gens
  mini = config.rl.mini_batch_size * gens
  if micro_rows_per_device:
    mini = max(mini // micro, 1) * micro
  if micro % dp:
    raise ValueError(f"micro-batch of {micro} rows is not divisible by data*fsdp={dp} of mesh {shape}")
  hosts = max(n // CHIPS_PER_HOST, 1)
  prompts = sampling_prompts or config.rollout.sampling_batch_size or config.data.batch_size // hosts
  # A training row: both turns' prompts (images included) and samples, padded to the first seq bucket
  # that holds a typical MGPO conversation; images at most max_pixels each.
  max_patches = config.image.max_pixels // (14 * 14)
  seq_len = seq_len or config.rollout.seq_buckets[0]
  patches_per_row = patches_per_row or 2 * max_patches
  # The shared prompt: the first prompt bucket (at most half the row) and its image (half the row's patches).
  prefix_len = prefix_len or min(config.rollout.prompt_buckets[0], seq_len // 2)
  prefix_patches = patches_per_row // 2 if prefix_patches is None else prefix_patches
  share = config.rl.share_prefix if share_prefix is None else share_prefix
  return Setup(
      topology=topology, num_chips=n, mesh=tuple(shape), sampling_mesh=tuple(s_shape),
      sampling_rules=config.mesh.sampling_rules, micro_rows=micro, mini_rows=mini,
      seq_len=seq_len, patches_per_row=patches_per_row,
      remat=config.model.remat if remat is None else remat,
      compute_bytes=BF16 if config.model.dtype == "bfloat16" else F32,
      logprob_chunk=config.rl.logprob_chunk_size,
      sampling_rows=prompts * gens, cache_len=cache_len or config.rollout.seq_buckets[-1],
      vision_impl=vision_impl, prefix_len=prefix_len, prefix_patches=prefix_patches,
      group_rows=gens if share else 1)


# ------------------------------------------------------------------------------------------------
# Parameters.
# ------------------------------------------------------------------------------------------------


def param_leaves(model_cfg) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
  """(path, shape, logical axes) of every parameter, from the abstract model (nothing allocated)."""
  _, state = nnx.split(abstract_model(model_cfg), nnx.Param)
  out = []
  for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    out.append((jax.tree_util.keystr(path), tuple(var.get_value().shape), tuple(var.axes)))
  return out


def _abstract_mesh(shape: Sequence[int]):
  return AbstractMesh(tuple(shape), shd.MESH_AXES)


def shard_elems(shape, axes, mesh, rules) -> int:
  """Elements of one device's shard (the learner's `logical_to_spec`, so indivisible dims replicate)."""
  spec = shd.logical_to_spec(axes, shape, mesh, rules)
  n = 1
  for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    n *= dim // (mesh.shape[ax] if ax else 1)
  return n


def param_bytes(leaves, mesh_shape, rules, itemsize: int) -> dict[str, float]:
  """Total and per-device bytes of the parameters under `rules` on `mesh_shape`."""
  mesh = _abstract_mesh(mesh_shape)
  total = sum(math.prod(s) for _, s, _ in leaves)
  per_device = sum(shard_elems(s, a, mesh, rules) for _, s, a in leaves)
  return {"elements": total, "total_bytes": total * itemsize, "per_device_elements": per_device,
          "per_device_bytes": per_device * itemsize, "shards": total / per_device}


# ------------------------------------------------------------------------------------------------
# Analytic activations of the current implementation.
# ------------------------------------------------------------------------------------------------


def _div(n: int, k: int) -> int:
  """n / k if k divides n, else n (the sharding table replicates indivisible dims)."""
  return n // k if n % k == 0 else n


def training_activations(cfg, s: Setup) -> dict[str, float]:
  """Bytes per device live during one micro step's backward (the peak of the update).

  Decoder: with remat (`jax.checkpoint(nothing_saveable)` per layer) the scan saves each layer's input
  [U, T, D]; the backward of one layer then holds its recomputed intermediates. Without remat every
  layer's intermediates are saved. Attention materialises scores (f32) and probabilities (compute dtype)
  [U, heads/tp, T, T], and their cotangents in the backward. Vision tower ("chunked", the code): attention
  per chunk of queries, never [P, P]; with remat only each block's input is saved.
  """
  U, T, tp, c = s.rows_per_device, s.continuation_len, s.mesh[2], s.compute_bytes
  G, S = s.prefixes_per_device, s.prefix_len
  D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
  N, K, H = _div(cfg.num_heads, tp), _div(cfg.num_kv_heads, tp), cfg.head_dim
  # Shared-prefix forward: G prefixes of S tokens (causal among themselves), U continuations of T tokens
  # attending to their prefix's S keys (gathered per row) and their own T.
  tokens = U * T + G * S
  pairs = U * T * (S + T) + G * S * S
  attn_saved = N * pairs * (F32 + c)                     # scores + probabilities
  attn_backward = N * pairs * (F32 + F32)                # their cotangents
  proj = tokens * ((N + 2 * K) * H + N * H) * c + U * S * 2 * K * H * c   # q, k, v, out; prefix k, v per row
  mlp = tokens * _div(F, tp) * 3 * c                     # gate, up, silu(gate) * up
  resid = tokens * D * (F32 + 3 * c)                     # x, norms (f32 inside rms_norm)
  layer_saved = attn_saved + proj + mlp + resid
  if s.remat:
    decoder_saved = L * tokens * D * c
    decoder_peak = layer_saved + attn_backward + proj + mlp
  else:
    decoder_saved = L * layer_saved
    decoder_peak = attn_backward + proj + mlp
  v = cfg.vision
  Nv, Dv, Fv = _div(v.num_heads, tp), v.hidden_size, _div(v.intermediate_size, tp)

  def vision(U, P):  # (saved, peak) of the vision tower over U image rows of P patches
    if P == 0 or U == 0:
      return 0, 0
    linear = P * (Dv * (F32 + 3 * c) + 3 * Dv * c + 3 * Fv * c)
    if s.vision_impl == "dense":
      vis_block = U * (Nv * P * P * (F32 + c + 1) + linear)
      return v.depth * vis_block + U * 2 * P * P, U * Nv * P * P * 2 * F32   # + the window / image masks
    if s.vision_impl == "chunked":
      C = min(VISION_CHUNK, P)
      band = (v.window_size // v.patch_size) ** 2
      full_scores = U * Nv * C * P * (F32 + c) * 2          # one chunk's scores/probs + cotangents (full block)
      window_scores = U * Nv * C * (C + 2 * band) * (F32 + c) * 2
      saved = v.depth * U * P * Dv * c if s.remat else v.depth * U * linear   # block inputs / activations
      return saved, U * 2 * linear + max(full_scores, window_scores)
    raise ValueError(f"vision_impl={s.vision_impl!r}: 'chunked' or 'dense'")

  (rows_saved, rows_peak), (pre_saved, pre_peak) = vision(U, s.continuation_patches), vision(G, s.prefix_patches)
  vision_saved, vision_peak = rows_saved + pre_saved, max(rows_peak, pre_peak)
  chunk = min(s.logprob_chunk, T)
  logits = U * chunk * _div(V, tp) * F32 * 3             # logits, softmax, cotangent of one chunk
  # FSDP: one layer's weights gathered over 'fsdp' (compute dtype), twice for overlap.
  layer_w = (D * (N + 2 * K) * H + N * H * D + 3 * D * _div(F, tp)) * c
  gathered = 2 * layer_w + D * _div(V, tp) * c
  return {
      "decoder_saved": decoder_saved, "decoder_layer_peak": decoder_peak,
      "vision_saved": vision_saved, "vision_block_peak": vision_peak,
      "logits_chunk": logits, "fsdp_gathered_weights": gathered,
      "total": decoder_saved + decoder_peak + vision_saved + vision_peak + logits + gathered,
  }


def kv_cache_bytes_per_row(cfg, cache_len: int, tp: int, itemsize: int) -> int:
  """K and V of every layer for one row, on one device (kv heads split over 'tensor' if they divide)."""
  return 2 * cfg.num_layers * cache_len * _div(cfg.num_kv_heads, tp) * cfg.head_dim * itemsize


# ------------------------------------------------------------------------------------------------
# The plan.
# ------------------------------------------------------------------------------------------------


def plan(cfg, s: Setup, chip: Chip) -> dict[str, Any]:
  leaves = param_leaves(cfg)
  sampling_rules = shd.SAMPLING_RULES if s.sampling_rules == "sampling" else shd.RULES
  p32 = param_bytes(leaves, s.mesh, shd.RULES, F32)
  pc = param_bytes(leaves, s.mesh, shd.RULES, s.compute_bytes)
  n_dev = p32["per_device_elements"]
  v = cfg.vision
  # One row of the mini-batch (int32 / f32 leaves of TrainBatch): 4 per continuation token, pixels + 4 per
  # patch, the merge-order index, and rewards, group id, valid box, prefix index, 2 turn lengths, 1 x 3 grid
  # values; one prefix: 2 per token, its image's pixels etc., 1 x 3 grid values. Prefix slots per device
  # per micro-batch: `prefixes_per_device`.
  Tc, Pc, Pp = s.continuation_len, s.continuation_patches, s.prefix_patches
  row_in = Tc * 4 * 4 + Pc * (v.patch_dim * F32 + 4 * 4) + Pc // v.merge_unit * 4 + 9 * 4
  prefix_in = s.prefix_len * 2 * 4 + Pp * (v.patch_dim * F32 + 4 * 4) + Pp // v.merge_unit * 4 + 3 * 4
  micro_steps = s.mini_rows // s.micro_rows
  state = {
      "minibatch_inputs": math.ceil(s.mini_rows / s.dp) * row_in + micro_steps * s.prefixes_per_device * prefix_in,
      "params_f32": n_dev * F32,
      "grad_accumulator_f32": n_dev * F32,
      "micro_grads": n_dev * s.compute_bytes,
      "adam_moments_f32": 2 * n_dev * F32,
      "compute_copy": n_dev * s.compute_bytes,
      "reference": n_dev * s.compute_bytes,
  }
  act = training_activations(cfg, s)
  train_total = sum(state.values()) + act["total"]
  # The sampler: its weights (compute dtype) in the sampling layout, the KV cache of its rows.
  ps = param_bytes(leaves, s.sampling_mesh, sampling_rules, s.compute_bytes)
  ps_fsdp = param_bytes(leaves, s.sampling_mesh, shd.RULES, s.compute_bytes)
  sdp = s.sampling_mesh[0] * s.sampling_mesh[1]
  rows_dev = math.ceil(s.sampling_rows / sdp)
  kv_row = kv_cache_bytes_per_row(cfg, s.cache_len, s.sampling_mesh[2], s.compute_bytes)
  resident = state["params_f32"] + state["adam_moments_f32"] + state["reference"]
  sampling = {
      "train_state_resident": resident,
      "sampler_weights": ps["per_device_bytes"],
      "kv_cache": rows_dev * kv_row,
      "decode_logits": rows_dev * _div(cfg.vocab_size, s.sampling_mesh[2]) * F32 * 2,
  }
  sampling_total = sum(sampling.values())
  # Handing new weights to the samplers: every device receives its sampler shard minus the part of it it
  # already holds as a learner shard (at most its compute-dtype training shard): a gather over the slice.
  reshard_in = max(ps["per_device_bytes"] - pc["per_device_bytes"], 0)
  # Decoding with the learner's layout instead (one SPMD sampler over the whole slice, FSDP over 'fsdp'):
  # each decode step gathers every FSDP-sharded weight again.
  fsdp = s.mesh[1]
  gather_step = pc["per_device_bytes"] * (fsdp - 1)
  rows_dev_fsdp = max(s.sampling_rows * max(s.num_chips // CHIPS_PER_HOST, 1) // s.dp, 1)
  limit = HEADROOM * chip.hbm_bytes
  peak = max(train_total, sampling_total)
  return {
      "topology": s.topology, "chip": chip.name, "chips": s.num_chips, "hbm_bytes": chip.hbm_bytes,
      "setup": dataclasses.asdict(s), "prefixes_per_device": s.prefixes_per_device,
      "params": {"count": p32["elements"], "count_b": p32["elements"] / 1e9,
                 "per_device_f32_bytes": p32["per_device_bytes"], "total_f32_bytes": p32["total_bytes"],
                 "shards": p32["shards"], "per_device_compute_bytes": pc["per_device_bytes"]},
      "training": {**state, **{f"act_{k}": v for k, v in act.items() if k != "total"},
                   "activations": act["total"], "total": train_total},
      "sampling": {**sampling, "total": sampling_total, "rows_per_device": rows_dev,
                   "kv_bytes_per_row": kv_row, "kv_bytes_per_token": kv_row / s.cache_len},
      "sharding_tradeoff": {
          "sampler_weights_per_device_sampling_rules": ps["per_device_bytes"],
          "sampler_weights_per_device_fsdp_rules": pc["per_device_bytes"],
          "reshard_bytes_in_per_device": reshard_in,
          "reshard_seconds_ici_estimate": reshard_in / chip.ici_bytes_s,
          "fsdp_allgather_bytes_per_decode_step": gather_step,
          "fsdp_allgather_bytes_per_decoded_token": gather_step / rows_dev_fsdp,
          "sampler_weights_per_device_local_fsdp_rules": ps_fsdp["per_device_bytes"],
          "fsdp_allgather_seconds_per_decode_step": gather_step / chip.ici_bytes_s,
          "decode_steps_to_amortise_reshard": reshard_in / gather_step if gather_step else float("inf"),
      },
      "peak_bytes": peak, "limit_bytes": limit, "fits": peak <= limit,
      "fits_training": train_total <= limit, "fits_sampling": sampling_total <= limit,
  }


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile of the real learner update (subprocess with a simulated CPU mesh).
# ------------------------------------------------------------------------------------------------


def abstract_train_inputs(learner, cfg, s: Setup):
  """ShapeDtypeStructs of (state, reference, mini-batch, rewards, group ids, index) for `learner`."""
  lc = learner.cfg
  SDS = jax.ShapeDtypeStruct
  _, params = nnx.split(abstract_model(cfg, lc.precision.param_dtype), nnx.Param)
  ref = jax.tree.map(lambda x: SDS(x.shape, lc.precision.compute_dtype), params)
  state = TrainState(step=SDS((), jnp.int32), params=params, opt_state=jax.eval_shape(learner.tx.init, params))
  K, U, T, P = s.mini_rows // s.micro_rows, s.micro_rows, s.continuation_len, s.continuation_patches
  G, S, Pp = s.dp * s.prefixes_per_device, s.prefix_len, s.prefix_patches
  v = cfg.vision
  i32, f32 = jnp.int32, jnp.float32

  def vision(n, P):
    if P == 0:
      return None
    return VisionInputs(pixels_PC=SDS((K, n, P, v.patch_dim), f32), pos_P2=SDS((K, n, P, 2), i32),
                        window_seg_P=SDS((K, n, P), i32), image_seg_P=SDS((K, n, P), i32),
                        restore_U=SDS((K, n, P // v.merge_unit), i32))

  mini = TrainBatch(
      prefix_ids_GS=SDS((K, G, S), i32), prefix_mask_GS=SDS((K, G, S), i32), prefix_vision=vision(G, Pp),
      prefix_grid_GI3=SDS((K, G, 1, 3), i32), prefix_index_B=SDS((K, U), i32),
      input_ids_BT=SDS((K, U, T), i32), mask_BT=SDS((K, U, T), i32), loss_mask_BT=SDS((K, U, T), f32),
      old_logp_BT=SDS((K, U, T), f32), rewards_B=SDS((K, U), f32), group_ids_B=SDS((K, U), i32),
      vision=vision(U, P), image_grid_BI3=SDS((K, U, 1, 3), i32), valid_box_B=SDS((K, U), f32),
      turn_lengths_BK=SDS((K, U, 2), i32))
  R = s.mini_rows
  return state, ref, mini, SDS((R,), f32), SDS((R,), i32), SDS((), i32)


_TPU_SHAPES = {  # chips -> the slice shape libtpu's topology names use
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"},
    "v4": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"},
}


def tpu_topology_devices(topology: str):
  """Device objects of a TPU slice WITHOUT the hardware (needs libtpu): compiling against them gives the
  TPU compiler's own memory_analysis."""
  chip, n = parse_topology(topology)
  shape = _TPU_SHAPES[chip.name].get(n)
  if shape is None:
    raise ValueError(f"no known slice shape for {n} {chip.name} chips")
  return topologies.get_topology_desc(platform="tpu", topology_name=f"{chip.name}:{shape}").devices


def aot_memory_here(cfg, s: Setup, devices=None) -> dict[str, Any]:
  """Lowers + compiles `Learner.update` on `devices` (default: this process's; >= the mesh size)."""
  n = math.prod(s.mesh)
  devices = list(devices if devices is not None else jax.devices())
  if len(devices) < n:
    raise RuntimeError(f"AOT needs {n} devices, have {len(devices)}")
  lc = LearnerConfig(micro_batch_size=s.micro_rows, num_mini_batches=1, logprob_chunk_size=s.logprob_chunk,
                     remat=s.remat, precision=Precision.BF16 if s.compute_bytes == BF16 else Precision.FLOAT32)
  learner = Learner(lc, cfg, shd.make_mesh(s.mesh, devices[:n]))
  args = abstract_train_inputs(learner, cfg, s)
  t0 = time.perf_counter()
  lowered = learner._update.lower(*args)  # pylint: disable=protected-access
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    # The TPU compiler refuses programs that exceed HBM: that IS the answer ("does not fit").
    msg = str(e)
    hit = re.search(r"HLO temporaries \(([\d.]+)([GMK])\).*available HBM \(([\d.]+)([GMK])\)", msg)
    if "RESOURCE_EXHAUSTED" not in msg:
      raise
    unit = {"G": 2**30, "M": 2**20, "K": 2**10}
    out = {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1, "backend": devices[0].platform,
           "devices": n, "device_kind": devices[0].device_kind, "fits": False, "error": msg.splitlines()[0][:400],
           "memory_analysis": None}
    if hit:
      out["temp_bytes_required"] = float(hit.group(1)) * unit[hit.group(2)]
      out["hbm_bytes_available"] = float(hit.group(3)) * unit[hit.group(4)]
    return out
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  out = {"lower_s": t1 - t0, "compile_s": t2 - t1, "backend": devices[0].platform, "devices": n,
         "device_kind": devices[0].device_kind}
  if m is None:
    out["memory_analysis"] = None
    return out
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes")
  out["memory_analysis"] = {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}
  ma = out["memory_analysis"]
  out["peak_estimate_bytes"] = (ma["argument_size_in_bytes"] + ma["output_size_in_bytes"]
                                - ma.get("alias_size_in_bytes", 0) + ma["temp_size_in_bytes"])
  return out


def aot_memory(cfg_path: str, topology: str, overrides: Mapping[str, Any], timeout_s: int = 600,
               model: str = "", backend: str = "cpu", python: str = "") -> dict[str, Any]:
  """`aot_memory_here` in a fresh process: backend "cpu" = `chips` simulated CPU devices; "tpu" = the
  slice's devices from libtpu's topology description (no TPU needed; `python` = an interpreter whose
  environment has libtpu, e.g. a venv with --system-site-packages)."""
  _, n = parse_topology(topology)
  if backend == "cpu":
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    devices = "None"
  elif backend == "tpu":
    env = dict(os.environ, TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost")
    env.pop("JAX_PLATFORMS", None)
    devices = f"p.tpu_topology_devices({topology!r})"
  else:
    raise ValueError(f"backend={backend!r}: 'cpu' or 'tpu'")
  # The config's repository (configs/ imports its siblings as `configs.base`).
  root = os.path.dirname(os.path.dirname(os.path.abspath(cfg_path)))
  code = (f"import json, sys; sys.path.insert(0, {root!r}); from mgpo_jax.plan import memory as p; "
          f"c = p.load_config({cfg_path!r}); m, _ = p.model_config(c, {model!r}); "
          f"s = p.setup_from_config(c, {topology!r}, **{dict(overrides)!r}); "
          f"print('AOT_JSON=' + json.dumps(p.aot_memory_here(m, s, {devices})))")
  r = subprocess.run([python or sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=timeout_s, cwd=root)
  for line in r.stdout.splitlines():
    if line.startswith("AOT_JSON="):
      return json.loads(line[len("AOT_JSON="):])
  raise RuntimeError(f"AOT subprocess failed (rc={r.returncode}):\n{r.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------------
# Search and report.
# ------------------------------------------------------------------------------------------------


def search(config, topology: str, cfg, **overrides) -> list[dict[str, Any]]:
  """Per tensor-parallel degree (data=1, fsdp=the rest): the most training rows per device (8, 4, 2, 1)
  and then the most sampling prompts (the config's, halved until it fits) for which both phases fit;
  best first (most training rows per chip, then most sampling rows)."""
  chip, n = parse_topology(topology)
  start = overrides.pop("sampling_prompts", None) or config.rollout.sampling_batch_size or config.data.batch_size
  fits = []
  for tp in (1, 2, 4, 8):
    if n % tp or cfg.num_kv_heads % tp or cfg.num_heads % tp:
      continue
    for rows in (8, 4, 2, 1):
      s = setup_from_config(config, topology, mesh=(1, n // tp, tp), micro_rows_per_device=rows,
                            sampling_prompts=start, **overrides)
      if not plan(cfg, s, chip)["fits_training"]:
        continue
      prompts = start
      while prompts >= 1:
        s = dataclasses.replace(s, sampling_rows=prompts * config.rollout.num_generations)
        p = plan(cfg, s, chip)
        if p["fits"]:
          fits.append(p)
          break
        prompts //= 2
      break
  return sorted(fits, key=lambda p: (-p["setup"]["micro_rows"] / p["chips"], -p["setup"]["sampling_rows"]))


def _gib(b: float) -> str:
  return f"{b / GiB:,.2f}"


def markdown(p: Mapping[str, Any], aot: Mapping[str, Any] | None = None, model_source: str = "") -> str:
  s = p["setup"]
  lines = [
      f"## {p['topology']}: {p['chips']} x {p['chip']} ({_gib(p['hbm_bytes'])} GiB HBM each)\n",
      f"- model: {p['params']['count_b']:.3f} B parameters ({model_source})",
      f"- training mesh (data, fsdp, tensor) = {tuple(s['mesh'])}; micro-batch {s['micro_rows']} rows = "
      f"{s['micro_rows'] // (s['mesh'][0] * s['mesh'][1])} per device; mini-batch {s['mini_rows']} rows; "
      f"{s['seq_len']} tokens and {s['patches_per_row']} vision patches per row, of which the prompt (a "
      f"{s['prefix_len']}-token prefix with {s['prefix_patches']} patches) is shared by {s['group_rows']} rows "
      f"({p['prefixes_per_device']} prefix slots per device); "
      f"remat: {'every decoder layer (nothing_saveable)' if s['remat'] else 'off'}; vision tower: "
      + ("dense [P, P] attention, no remat (the earlier implementation)" if s["vision_impl"] == "dense" else
         f"chunked attention, {'per-block remat' if s['remat'] else 'no remat'} (current code)"),
      f"- sampling: per host ({min(CHIPS_PER_HOST, p['chips'])} chips) mesh {tuple(s['sampling_mesh'])}, rules "
      f"'{s['sampling_rules']}', {s['sampling_rows']} rows ({p['sampling']['rows_per_device']} per device), "
      f"KV cache {s['cache_len']} slots per row",
      "",
      "| per device | GiB |", "|---|---|",
  ]
  t = p["training"]
  for k in ("params_f32", "grad_accumulator_f32", "micro_grads", "adam_moments_f32", "compute_copy", "reference",
            "minibatch_inputs"):
    lines.append(f"| train: {k} | {_gib(t[k])} |")
  for k in ("act_decoder_saved", "act_decoder_layer_peak", "act_vision_saved", "act_vision_block_peak",
            "act_logits_chunk", "act_fsdp_gathered_weights"):
    lines.append(f"| train: {k} | {_gib(t[k])} |")
  lines.append(f"| **train total** | **{_gib(t['total'])}** |")
  for k in ("train_state_resident", "sampler_weights", "kv_cache", "decode_logits"):
    lines.append(f"| sample: {k} | {_gib(p['sampling'][k])} |")
  lines.append(f"| **sample total** | **{_gib(p['sampling']['total'])}** |")
  lines.append(f"| limit ({int(HEADROOM * 100)}% of HBM) | {_gib(p['limit_bytes'])} |")
  lines.append("")
  lines.append(f"**fits: {'YES' if p['fits'] else 'NO'}** (training {'fits' if p['fits_training'] else 'does NOT fit'}, "
               f"sampling {'fits' if p['fits_sampling'] else 'does NOT fit'})\n")
  st = p["sharding_tradeoff"]
  lines += [
      "Sampling vs training sharding (sampler weights, compute dtype):",
      f"- per device: {_gib(st['sampler_weights_per_device_sampling_rules'])} GiB for the per-host sampler "
      f"(tensor-parallel over the host's chips) vs {_gib(st['sampler_weights_per_device_fsdp_rules'])} GiB in the "
      "learner's layout (RULES: FSDP x tensor over the slice)",
      f"- reshard learner -> samplers once per policy update: {_gib(st['reshard_bytes_in_per_device'])} GiB "
      f"in per device (~{st['reshard_seconds_ici_estimate'] * 1e3:.0f} ms at ICI peak)",
      f"- decoding in the learner's layout instead: all-gather {_gib(st['fsdp_allgather_bytes_per_decode_step'])} GiB per device "
      f"per decode step = {st['fsdp_allgather_bytes_per_decoded_token'] / 2**20:,.1f} MiB per decoded token "
      f"(~{st['fsdp_allgather_seconds_per_decode_step'] * 1e3:.1f} ms per step at ICI peak); the reshard "
      f"pays for itself after {st['decode_steps_to_amortise_reshard']:.2f} decode steps",
  ]
  if aot is not None and aot.get("fits") is False:
    lines += ["", f"AOT on {aot['devices']} x {aot.get('device_kind', aot['backend'])}: the compiler REFUSED it "
              f"(**does NOT fit**): {aot['error']}"]
  elif aot is not None and aot.get("memory_analysis") is None:
    lines += ["", f"AOT failed or unavailable: {aot.get('error', 'no memory_analysis')[-600:]}"]
  elif aot is not None:
    ma = aot.get("memory_analysis") or {}
    where = (f"{aot['devices']} simulated CPU devices" if aot["backend"] == "cpu" else
             f"{aot['devices']} x {aot.get('device_kind', aot['backend'])} from libtpu's topology, no hardware")
    lines += ["", f"AOT (`Learner.update` lowered for abstract inputs, {where}, compile {aot['compile_s']:.1f} s): "
              + ", ".join(f"{k.replace('_size_in_bytes', '')} {_gib(v)} GiB" for k, v in ma.items())
              + (f"; peak ~{_gib(aot['peak_estimate_bytes'])} GiB (arguments + outputs - aliased + temporaries)"
                 if "peak_estimate_bytes" in aot else "")]
    if aot.get("backend") == "tpu" and "peak_estimate_bytes" in aot:
      ok = aot["peak_estimate_bytes"] <= p["hbm_bytes"]
      lines.append(f"**TPU compiler's view: {'fits' if ok else 'does NOT fit'}** in {_gib(p['hbm_bytes'])} GiB")
  return "\n".join(lines) + "\n"
