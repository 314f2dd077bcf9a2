"""Hugging Face <-> mgpo_jax parameter mapping, as one table beside the model.

Each row: HF key (with `{i}` for the layer), our parameter path, whether our array is stacked over layers,
and the layout rule. `transpose=True` means: view the HF tensor as 2-D (first dim x the rest), transpose it
(torch Linear stores [out, in]; we store [in, out]) and reshape to our shape (e.g. [D, heads, head_dim]).
The inverse is exact, so HF -> ours -> HF is bit-exact.

Keys are matched in the released flat layout (`visual.*`, `model.layers.*`, `model.embed_tokens.*`,
`lm_head.*`); the newer in-memory layout (`model.visual.*`, `model.language_model.*`) is renamed first.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mgpo_jax.models.qwen2_5_vl import safetensors_io
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from mgpo_jax.models.qwen2_5_vl.model import Qwen25VL
from mgpo_jax.parallel import sharding as shd


class CheckpointMismatchError(ValueError):
  """A tensor is missing, unexpected, or has the wrong shape."""


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str                 # HF key, `{i}` = layer index
  ours: tuple[str, ...]   # attribute path in Qwen25VL
  hf_shape: Callable[[Qwen25VLConfig], tuple[int, ...]]
  transpose: bool = False
  stacked: bool = False   # our array has a leading layers axis


def _text(c):
  return c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size


def _vis(c):
  v = c.vision
  return v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit


RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed",), lambda c: (c.vocab_size, c.hidden_size)),
    Rule("model.norm.weight", ("final_norm",), lambda c: (c.hidden_size,)),
    Rule("lm_head.weight", ("lm_head",), lambda c: (c.vocab_size, c.hidden_size), transpose=True),
    Rule("model.layers.{i}.input_layernorm.weight", ("input_norm",), lambda c: (c.hidden_size,), stacked=True),
    Rule("model.layers.{i}.post_attention_layernorm.weight", ("post_norm",), lambda c: (c.hidden_size,),
         stacked=True),
    Rule("model.layers.{i}.self_attn.q_proj.weight", ("q",), lambda c: (_text(c)[1], c.hidden_size), True, True),
    Rule("model.layers.{i}.self_attn.q_proj.bias", ("q_bias",), lambda c: (_text(c)[1],), stacked=True),
    Rule("model.layers.{i}.self_attn.k_proj.weight", ("k",), lambda c: (_text(c)[2], c.hidden_size), True, True),
    Rule("model.layers.{i}.self_attn.k_proj.bias", ("k_bias",), lambda c: (_text(c)[2],), stacked=True),
    Rule("model.layers.{i}.self_attn.v_proj.weight", ("v",), lambda c: (_text(c)[2], c.hidden_size), True, True),
    Rule("model.layers.{i}.self_attn.v_proj.bias", ("v_bias",), lambda c: (_text(c)[2],), stacked=True),
    Rule("model.layers.{i}.self_attn.o_proj.weight", ("o",), lambda c: (c.hidden_size, _text(c)[1]), True, True),
    Rule("model.layers.{i}.mlp.gate_proj.weight", ("gate",), lambda c: (c.intermediate_size, c.hidden_size),
         True, True),
    Rule("model.layers.{i}.mlp.up_proj.weight", ("up",), lambda c: (c.intermediate_size, c.hidden_size),
         True, True),
    Rule("model.layers.{i}.mlp.down_proj.weight", ("down",), lambda c: (c.hidden_size, c.intermediate_size),
         True, True),
    # ---- vision tower
    Rule("visual.patch_embed.proj.weight", ("visual", "patch_embed"),
         lambda c: (c.vision.hidden_size, c.vision.in_channels, c.vision.temporal_patch_size,
                    c.vision.patch_size, c.vision.patch_size), transpose=True),
    Rule("visual.blocks.{i}.norm1.weight", ("visual", "norm1"), lambda c: (_vis(c)[0],), stacked=True),
    Rule("visual.blocks.{i}.norm2.weight", ("visual", "norm2"), lambda c: (_vis(c)[0],), stacked=True),
    Rule("visual.blocks.{i}.attn.qkv.weight", ("visual", "qkv"), lambda c: (3 * _vis(c)[0], _vis(c)[0]),
         True, True),
    Rule("visual.blocks.{i}.attn.qkv.bias", ("visual", "qkv_bias"), lambda c: (3 * _vis(c)[0],), stacked=True),
    Rule("visual.blocks.{i}.attn.proj.weight", ("visual", "proj"), lambda c: (_vis(c)[0], _vis(c)[0]),
         True, True),
    Rule("visual.blocks.{i}.attn.proj.bias", ("visual", "proj_bias"), lambda c: (_vis(c)[0],), stacked=True),
    Rule("visual.blocks.{i}.mlp.gate_proj.weight", ("visual", "gate"), lambda c: (_vis(c)[1], _vis(c)[0]),
         True, True),
    Rule("visual.blocks.{i}.mlp.gate_proj.bias", ("visual", "gate_bias"), lambda c: (_vis(c)[1],), stacked=True),
    Rule("visual.blocks.{i}.mlp.up_proj.weight", ("visual", "up"), lambda c: (_vis(c)[1], _vis(c)[0]),
         True, True),
    Rule("visual.blocks.{i}.mlp.up_proj.bias", ("visual", "up_bias"), lambda c: (_vis(c)[1],), stacked=True),
    Rule("visual.blocks.{i}.mlp.down_proj.weight", ("visual", "down"), lambda c: (_vis(c)[0], _vis(c)[1]),
         True, True),
    Rule("visual.blocks.{i}.mlp.down_proj.bias", ("visual", "down_bias"), lambda c: (_vis(c)[0],), stacked=True),
    Rule("visual.merger.ln_q.weight", ("visual", "merger_norm"), lambda c: (_vis(c)[0],)),
    Rule("visual.merger.mlp.0.weight", ("visual", "merger_fc1"), lambda c: (_vis(c)[2], _vis(c)[2]),
         transpose=True),
    Rule("visual.merger.mlp.0.bias", ("visual", "merger_fc1_bias"), lambda c: (_vis(c)[2],)),
    Rule("visual.merger.mlp.2.weight", ("visual", "merger_fc2"), lambda c: (c.vision.out_hidden_size, _vis(c)[2]),
         transpose=True),
    Rule("visual.merger.mlp.2.bias", ("visual", "merger_fc2_bias"), lambda c: (c.vision.out_hidden_size,)),
)


def canonical_key(key: str) -> str:
  """Newer transformers layout -> released flat layout."""
  key = re.sub(r"^model\.visual\.", "visual.", key)
  return re.sub(r"^model\.language_model\.", "model.", key)


def active_rules(cfg: Qwen25VLConfig) -> list[Rule]:
  return [r for r in RULES if not (cfg.tie_word_embeddings and r.ours == ("lm_head",))]


def num_layers_for(rule: Rule, cfg: Qwen25VLConfig) -> int:
  return cfg.vision.depth if rule.ours[0] == "visual" else cfg.num_layers


def hf_keys(rule: Rule, cfg: Qwen25VLConfig) -> list[str]:
  if not rule.stacked:
    return [rule.hf]
  return [rule.hf.format(i=i) for i in range(num_layers_for(rule, cfg))]


def hf_shapes(cfg: Qwen25VLConfig) -> dict[str, tuple[int, ...]]:
  """Every HF key of the released layout with its shape (for shape checks without allocating)."""
  return {k: tuple(r.hf_shape(cfg)) for r in active_rules(cfg) for k in hf_keys(r, cfg)}


def hf_to_ours(rule: Rule, w: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
  if rule.transpose:
    w = w.reshape(w.shape[0], -1).T
  return w.reshape(our_shape)


def ours_to_hf(rule: Rule, w: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
  if rule.transpose:
    return np.ascontiguousarray(w.reshape(-1, hf_shape[0]).T).reshape(hf_shape)
  return w.reshape(hf_shape)


def _get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set_path(tree, path, value):
  for p in path[:-1]:
    tree = tree[p]
  tree[path[-1]] = value


def abstract_model(cfg: Qwen25VLConfig, dtype=jnp.float32) -> Qwen25VL:
  return nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def load_hf_state(hf_dir: str | os.PathLike, cfg: Qwen25VLConfig, dtype=jnp.float32, mesh: Mesh | None = None,
                  rules: Mapping[str, str | None] = shd.RULES, allow_unknown: bool = False,
                  progress: bool = False):
  """Stream an HF checkpoint into an nnx.State (graphdef, state) placed with the logical shardings.

  Host memory stays near one copy of the weights: tensors are read with pread (no file pages stay
  mapped), a stacked parameter is filled layer by layer into a donated device buffer (so no second
  host copy of a [layers, ...] array exists), and a non-stacked one goes through one host buffer.
  Every piece is placed with `make_array_from_callback`, so each device receives only its own shard.
  """
  # canonical key -> (file, key as stored in the file)
  tensors = {canonical_key(k): (sf, k) for k, sf in safetensors_io.open_dir(hf_dir).items()}
  graphdef, abs_state = nnx.split(abstract_model(cfg, dtype))
  pure = nnx.to_pure_dict(abs_state)
  shardings = (shd.state_shardings(abs_state, mesh, rules) if mesh is not None else None)
  used: set[str] = set()
  arules = active_rules(cfg)
  if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
    used.add("lm_head.weight")  # redundant copy of the tied embedding; ignored
  expected = {k for r in arules for k in hf_keys(r, cfg)}
  missing = sorted(expected - set(tensors))
  if missing:
    raise CheckpointMismatchError(
        f"{hf_dir}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:3]}")
  unknown = sorted(set(tensors) - expected - used)
  if unknown and not allow_unknown:
    raise CheckpointMismatchError(
        f"{hf_dir}: {len(unknown)} unexpected tensor(s), e.g. {unknown[:3]} (pass allow_unknown=True to skip)")
  if unknown:
    logging.warning("skipping %d unknown tensor(s): %s", len(unknown), unknown)
  # Every shape is checked from the headers before anything is allocated.
  for rule in arules:
    expected_hf = tuple(rule.hf_shape(cfg))
    for key in hf_keys(rule, cfg):
      sf, stored_key = tensors[key]
      if sf.shape(stored_key) != expected_hf:
        raise CheckpointMismatchError(
            f"tensor {key!r} has shape {sf.shape(stored_key)}, but the config expects {expected_hf}")
  np_dtype = np.dtype(jnp.dtype(dtype))
  bar = None
  if progress:
    bar = tqdm(total=len(expected), desc="loading", unit="tensor", disable=None)

  def read(key: str) -> np.ndarray:
    sf, stored_key = tensors[key]
    w = sf.read(stored_key)
    if bar is not None:
      bar.update(1)
    return w

  for rule in arules:
    shape = tuple(_get_path(pure, rule.ours).shape)
    keys = hf_keys(rule, cfg)
    sharding = (_get_path(shardings, rule.ours) if shardings is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    if hasattr(sharding, "value"):  # a Variable-shaped leaf of the sharding tree
      sharding = sharding.value
    if rule.stacked:
      arr = _zeros(sharding, shape, np_dtype)
      layer_sharding = _drop_leading_axis(sharding, len(shape))
      for i, key in enumerate(keys):
        piece = hf_to_ours(rule, read(key), shape[1:]).astype(np_dtype, copy=False)
        layer = jax.make_array_from_callback(shape[1:], layer_sharding, lambda idx, p=piece: p[idx])
        # Block: with async dispatch the loop would run ahead and queue many layers' host copies.
        arr = _set_layer(sharding)(arr, layer, np.int32(i)).block_until_ready()
        del piece, layer
    else:
      buf = hf_to_ours(rule, read(keys[0]), shape).astype(np_dtype, copy=False)
      arr = jax.make_array_from_callback(shape, sharding, lambda idx, b=buf: b[idx])
      del buf
    _set_path(pure, rule.ours, arr)
  if bar is not None:
    bar.close()
  nnx.replace_by_pure_dict(abs_state, pure)
  return graphdef, abs_state


def _zeros(sharding, shape, dtype) -> jax.Array:
  return _zeros_fn(sharding)(tuple(shape), np.dtype(dtype))


@functools.lru_cache(maxsize=None)
def _zeros_fn(sharding):
  # Allocated directly with its final sharding: each device only holds its shard.
  return jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _set_layer(sharding):
  # Donating the stacked buffer makes the per-layer update in place (no second copy of the array).
  return jax.jit(lambda full, x, i: jax.lax.dynamic_update_index_in_dim(full, x.astype(full.dtype), i, 0),
                 donate_argnums=0, out_shardings=sharding)


def _drop_leading_axis(sharding, ndim: int):
  """Sharding of one layer of a stacked array: the same placement without the layers axis."""
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(*spec[1:]))
  return sharding


def from_pretrained(hf_dir: str | os.PathLike, dtype=jnp.float32, mesh: Mesh | None = None,
                    rules: Mapping[str, str | None] = shd.RULES, allow_unknown: bool = False) -> Qwen25VL:
  """Build the model from an HF directory (config.json + safetensors), directly sharded on `mesh`."""
  cfg = Qwen25VLConfig.from_pretrained(hf_dir)
  graphdef, state = load_hf_state(hf_dir, cfg, dtype, mesh, rules, allow_unknown)
  return nnx.merge(graphdef, state)


def init_model(cfg: Qwen25VLConfig, seed: int = 0, dtype=jnp.float32, mesh: Mesh | None = None,
               rules: Mapping[str, str | None] = shd.RULES) -> Qwen25VL:
  """Randomly initialised model, created directly sharded (no full copy on one device)."""
  make = lambda: nnx.split(Qwen25VL(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))[1]
  graphdef, abs_state = nnx.split(abstract_model(cfg, dtype))
  if mesh is None:
    return nnx.merge(graphdef, jax.jit(make)())
  out = shd.state_shardings(abs_state, mesh, rules)
  return nnx.merge(graphdef, jax.jit(make, out_shardings=out)())


def iter_hf_tensors(state: nnx.State, cfg: Qwen25VLConfig, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """Our state -> (HF key, numpy array) in the released flat layout, one tensor at a time."""
  pure = nnx.to_pure_dict(state)
  for rule in active_rules(cfg):
    arr = _get_path(pure, rule.ours)
    hf_shape = tuple(rule.hf_shape(cfg))
    keys = hf_keys(rule, cfg)
    for i, key in enumerate(keys):
      piece = np.asarray(jax.device_get(arr[i] if rule.stacked else arr))
      if dtype is not None:
        piece = piece.astype(dtype)
      yield key, ours_to_hf(rule, piece, hf_shape)


def num_params(cfg: Qwen25VLConfig) -> int:
  return sum(math.prod(s) for s in hf_shapes(cfg).values())
