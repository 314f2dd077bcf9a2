"""Qwen2.5-VL checkpoints: a ready model from an Orbax root, and HF safetensors <-> Orbax.

The root's layout and the Orbax plumbing are `mgpo_jax.io.checkpoint`; this module adds what needs the
model: checking the stored arrays against `hf_config.json`, restoring a `Qwen25VL`, and the conversions
of `tools/convert_weights.py` through the HF mapping table (`params.py`). `restore_params` /
`export_hf` read trainer runs and converter outputs alike (given ROOT or WORKDIR).

Host memory: `import_hf` holds one copy of the weights in the target dtype (the state being saved);
`export_hf` reads one parameter at a time and writes tensor by tensor, so it never holds the model.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from mgpo_jax.io import checkpoint as ckpt_io
from mgpo_jax.io import paths
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl import safetensors_io
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from mgpo_jax.models.qwen2_5_vl.model import Qwen25VL
from mgpo_jax.parallel import sharding as shd

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # like the released checkpoints (transformers' "5GB")

Path = ckpt_io.Path


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
  """'5GB' -> 5_000_000_000 (decimal units as transformers; KiB/MiB/GiB binary); ints pass through."""
  if isinstance(size, int):
    n = size
  else:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
    if not m or m.group(2).upper() not in _SIZE_UNITS:
      raise ValueError(f"invalid size {size!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
  if n <= 0:
    raise ValueError(f"size must be positive, got {size!r}")
  return n


# ----------------------------------------------------------------------------- the root
def write_root(ckpt_dir: str | os.PathLike, hf_config: Mapping[str, Any],
               assets_from: str | os.PathLike | None = None) -> None:
  """`io.checkpoint.write_root` for a Qwen2.5-VL: `hf_config` must parse (fail now, not at export time)."""
  Qwen25VLConfig.from_hf_dict(hf_config)
  ckpt_io.write_root(ckpt_dir, hf_config, assets_from)


def save_params(ckpt_dir: str | os.PathLike, state: nnx.State | Mapping[str, Any], hf_config: Mapping[str, Any],
                step: int = 0, assets_from: str | os.PathLike | None = None) -> str:
  """`io.checkpoint.save_params` with the config checked as in `write_root`; returns the step directory."""
  Qwen25VLConfig.from_hf_dict(hf_config)
  return ckpt_io.save_params(ckpt_dir, state, hf_config, step, assets_from)


def _expected_params(cfg: Qwen25VLConfig) -> dict[Path, tuple[int, ...]]:
  _, abs_state = nnx.split(params_lib.abstract_model(cfg))
  return {p: tuple(v.shape) for p, v in ckpt_io.flatten(nnx.to_pure_dict(abs_state)).items()}


def _check_params(saved: Mapping[Path, tuple], expected: Mapping[Path, tuple[int, ...]], where: str) -> None:
  missing = sorted(set(expected) - set(saved))
  if missing:
    raise params_lib.CheckpointMismatchError(
        f"{where}: {len(missing)} parameter(s) missing, e.g. {[ckpt_io.path_str(p) for p in missing[:3]]}")
  unknown = sorted(set(saved) - set(expected))
  if unknown:
    raise params_lib.CheckpointMismatchError(
        f"{where}: {len(unknown)} unexpected parameter(s), e.g. {[ckpt_io.path_str(p) for p in unknown[:3]]}")
  for p, shape in expected.items():
    if saved[p][0] != shape:
      raise params_lib.CheckpointMismatchError(
          f"parameter {ckpt_io.path_str(p)!r} has shape {saved[p][0]} in {where}, but {ckpt_io.HF_CONFIG} expects {shape}")


def _open(ckpt_dir, step):
  root = ckpt_io.find_root(ckpt_dir)
  step, pdir = ckpt_io.params_dir(root, step)
  hf_config = ckpt_io.read_json(os.path.join(root, ckpt_io.HF_CONFIG))
  cfg = Qwen25VLConfig.from_hf_dict(hf_config)
  saved = ckpt_io.saved_params(pdir)
  _check_params(saved, _expected_params(cfg), pdir)
  return root, step, pdir, hf_config, cfg, saved


# ----------------------------------------------------------------------------- restore
def restore_params(ckpt_dir: str | os.PathLike, step: int | None = None, dtype=None, mesh: Mesh | None = None,
                   rules: Mapping[str, str | None] = shd.RULES) -> tuple[Qwen25VLConfig, dict, nnx.State]:
  """Restore item PARAMS of `step` (default: the latest) straight onto `mesh`.

  `ckpt_dir` is a checkpoint root or a trainer WORKDIR. The abstract target is the `nnx.eval_shape`
  state with NamedShardings from `sharding.state_shardings(..., mesh, rules)`: each device reads only
  its shard (one device when `mesh` is None). `dtype` (e.g. jnp.bfloat16) casts while reading (round to
  nearest even); None keeps the stored dtypes. Returns (config, HF config dict, nnx.State).
  """
  _, _, pdir, hf_config, cfg, saved = _open(ckpt_dir, step)
  _, abs_state = nnx.split(params_lib.abstract_model(cfg))
  want = ckpt_io.dtype_of(dtype)
  args = ckpt_io.params_restore_args(abs_state, mesh, rules)
  targets = {p: jax.ShapeDtypeStruct(t.shape, want if want is not None else saved[p][1], sharding=t.sharding)
             for p, t in ckpt_io.flatten(args.item).items()}
  try:
    restored = ocp.Checkpointer(ckpt_io.params_handler()).restore(pdir, args=ckpt_io.restore_args(targets))
  except Exception as e:
    raise ckpt_io.CheckpointError(f"{pdir}: cannot restore ({ckpt_io.short_error(e)})") from None
  nnx.replace_by_pure_dict(abs_state, restored)
  return cfg, hf_config, abs_state


def restore_model(ckpt_dir: str | os.PathLike, step: int | None = None, dtype=None, mesh: Mesh | None = None,
                  rules: Mapping[str, str | None] = shd.RULES) -> Qwen25VL:
  """`restore_params` merged into a ready Qwen25VL."""
  cfg, _, state = restore_params(ckpt_dir, step, dtype, mesh, rules)
  graphdef, _ = nnx.split(params_lib.abstract_model(cfg))
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- HF -> checkpoint
def _source_dtype(hf_dir: str) -> np.dtype:
  tensors = {params_lib.canonical_key(k): (sf, k) for k, sf in safetensors_io.open_dir(hf_dir).items()}
  sf, key = tensors.get("model.embed_tokens.weight") or next(iter(tensors.values()))
  return sf.dtype(key)


def import_hf(hf_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, dtype=None, allow_unknown: bool = False,
              overwrite: bool = False, progress: bool = False) -> str:
  """HF directory (config.json + safetensors) -> checkpoint root `ckpt_dir` with step 0.

  `dtype` None/'auto' keeps the stored dtype (of the embedding). Written atomically: nothing appears at
  `ckpt_dir` unless the whole conversion succeeds. Returns `ckpt_dir`.
  """
  hf_dir = os.fspath(hf_dir)
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f"source directory {hf_dir!r} does not exist")
  hf_config = ckpt_io.read_json(os.path.join(hf_dir, "config.json"))
  cfg = Qwen25VLConfig.from_hf_dict(hf_config)
  target = ckpt_io.dtype_of(dtype) or _source_dtype(hf_dir)
  with ckpt_io.atomic_dir(ckpt_dir, overwrite, src=hf_dir) as tmp:
    _, state = params_lib.load_hf_state(hf_dir, cfg, target, None, allow_unknown=allow_unknown,
                                        progress=progress)
    save_params(tmp, state, hf_config, step=0, assets_from=hf_dir)
    del state
  return os.fspath(ckpt_dir)


# ----------------------------------------------------------------------------- checkpoint -> HF
def plan_shards(specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]], max_shard_size: int) -> list[list]:
  """Split tensors, in order, into files of at most `max_shard_size` bytes (a larger tensor gets its own
  file), as transformers' `save_pretrained` does."""
  shards, cur, cur_size = [], [], 0
  for spec in specs:
    size = int(np.prod(spec[2])) * np.dtype(spec[1]).itemsize
    if cur and cur_size + size > max_shard_size:
      shards.append(cur)
      cur, cur_size = [], 0
    cur.append(spec)
    cur_size += size
  if cur:
    shards.append(cur)
  return shards


def export_config(hf_config: Mapping[str, Any], dtype: np.dtype) -> dict[str, Any]:
  """The HF config dict with its dtype fields set to the exported dtype (else verbatim)."""
  out = copy.deepcopy(dict(hf_config))
  name = np.dtype(dtype).name
  found = False
  for d in (out, out.get("text_config"), out.get("vision_config")):
    if isinstance(d, dict):
      for k in ("torch_dtype", "dtype"):
        if k in d:
          d[k], found = name, True
  if not found:
    out["torch_dtype"] = name
  return out


def _iter_hf(pdir: str, cfg: Qwen25VLConfig, out_dtypes: Mapping[Path, np.dtype]
             ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF key, array) in `params.hf_shapes` order, reading one stored parameter at a time."""
  for rule in params_lib.active_rules(cfg):
    arr = ckpt_io.read_param(pdir, rule.ours)
    hf_shape = tuple(rule.hf_shape(cfg))
    for i, key in enumerate(params_lib.hf_keys(rule, cfg)):
      piece = arr[i] if rule.stacked else arr
      piece = piece.astype(out_dtypes[rule.ours], copy=False)  # numpy casts round to nearest even
      yield key, params_lib.ours_to_hf(rule, piece, hf_shape)
    del arr


def export_hf(ckpt_dir: str | os.PathLike, hf_dir: str | os.PathLike, step: int | None = None, dtype=None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
              progress: bool = False) -> str:
  """Checkpoint root or trainer WORKDIR -> HF directory loadable by `from_pretrained`.

  Writes config.json (the stored HF config, dtype updated), `model-0000k-of-0000n.safetensors` in the
  released flat key layout (files of about `max_shard_size` bytes), `model.safetensors.index.json`, and
  the stored assets. `dtype` None/'auto' keeps the stored dtypes. Atomic like `import_hf`.
  """
  max_bytes = parse_size(max_shard_size)
  root, step, pdir, hf_config, cfg, saved = _open(ckpt_dir, step)
  want = ckpt_io.dtype_of(dtype)
  out_dtypes = {p: (want if want is not None else dt) for p, (_, dt) in saved.items()}
  specs = [(key, out_dtypes[rule.ours], tuple(rule.hf_shape(cfg)))
           for rule in params_lib.active_rules(cfg) for key in params_lib.hf_keys(rule, cfg)]
  assert [s[0] for s in specs] == list(params_lib.hf_shapes(cfg)), "export order drifted from hf_shapes"
  shards = plan_shards(specs, max_bytes)
  n = len(shards)
  names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  total = sum(int(np.prod(s[2])) * np.dtype(s[1]).itemsize for s in specs)
  embed_dtype = out_dtypes[("embed",)]
  with ckpt_io.atomic_dir(hf_dir, overwrite, src=root) as tmp:
    bar = None
    if progress:
      bar = tqdm(total=total, desc="writing", unit="B", unit_scale=True, disable=None)
    tensors = _iter_hf(pdir, cfg, out_dtypes)
    for name, shard in zip(names, shards):
      safetensors_io.write_streaming(os.path.join(tmp, name), shard, tensors, metadata={"format": "pt"},
                                     on_write=None if bar is None else bar.update)
    if next(tensors, None) is not None:
      raise ckpt_io.CheckpointError("internal error: more tensors than planned")
    if bar is not None:
      bar.close()
    index = {"metadata": {"total_size": total, "total_parameters": params_lib.num_params(cfg)},
             "weight_map": {s[0]: name for name, shard in zip(names, shards) for s in shard}}
    paths.write_json_atomic(os.path.join(tmp, "model.safetensors.index.json"), index)
    paths.write_json_atomic(os.path.join(tmp, "config.json"), export_config(hf_config, embed_dtype))
    ckpt_io.copy_assets(os.path.join(root, ckpt_io.HF_ASSETS), tmp)
  logging.info("exported step %d of %s to %s (%d file(s), %d bytes)", step, root, hf_dir, n, total)
  return os.fspath(hf_dir)
