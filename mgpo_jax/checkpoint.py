"""The on-disk format of model parameters, shared by the trainer and `tools/convert_weights.py`.

A checkpoint ROOT (the trainer's `WORKDIR/checkpoints`, or a converter output) looks like:

  ROOT/
    hf_config.json     the model's Hugging Face config dict, verbatim (exports stay faithful to it)
    hf_assets/         tokenizer / processor / chat-template / generation-config files, copied along
    <step>/            one Orbax `CheckpointManager` step (default step naming: the bare number)
      params/          item PARAMS: the NNX state as a pure dict (`nnx.to_pure_dict`), one array per
                       parameter, our layout (stacked layers, [in, out] kernels), uncompressed
      opt_state/ ...   (trainer only) any other items; never read here

The trainer builds its own `ocp.CheckpointManager(ROOT, item_handlers={PARAMS: params_handler(), ...})`,
calls `write_root(ROOT, hf_config, assets_from=hf_dir)` once, saves PARAMS with `params_save_args(state)`
and resumes with `params_restore_args(abstract_state, mesh)`; `restore_params` / `export_hf` read its runs
and converter outputs alike (given ROOT or WORKDIR). Steps must use Orbax's default naming (`<step>`).

Why uncompressed, one chunk per array: Orbax then writes straight from the arrays' buffers, so saving
adds no host copy (zstd buffers a compressed copy of the whole array until it is written).

Host memory: `import_hf` holds one copy of the weights in the target dtype (the state being saved);
`export_hf` reads one parameter at a time and writes tensor by tensor, so it never holds the model.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from mgpo_jax import sharding as shd
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl import safetensors_io
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from mgpo_jax.models.qwen2_5_vl.model import Qwen25VL

PARAMS = "params"
HF_CONFIG = "hf_config.json"
HF_ASSETS = "hf_assets"
CHECKPOINTS_SUBDIR = "checkpoints"  # a trainer WORKDIR keeps its checkpoint root here

# Files of an HF model directory that travel with the weights (tokenizer, processor, chat template,
# generation defaults). Weights and config.json are never copied: they are (re)written.
ASSET_PATTERNS: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "*.tiktoken",
    "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)
ASSET_DIRS: tuple[str, ...] = ("additional_chat_templates",)

# Export dtypes by name (the names transformers writes as `torch_dtype` / `dtype`).
DTYPES: Mapping[str, np.dtype] = {
    "bfloat16": np.dtype(jnp.bfloat16), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
}
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # like the released checkpoints (transformers' "5GB")

Path = tuple[str, ...]


class CheckpointError(ValueError):
  """A checkpoint directory is missing, incomplete, or does not match its config."""


# ----------------------------------------------------------------------------- small helpers
def dtype_of(name_or_dtype) -> np.dtype | None:
  """None/'auto' -> None (keep the stored dtype); else a numpy dtype from a name or dtype."""
  if name_or_dtype is None or name_or_dtype == "auto":
    return None
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in DTYPES:
      raise ValueError(f"unsupported dtype {name_or_dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name_or_dtype]
  return np.dtype(name_or_dtype)


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


def is_remote(path: str | os.PathLike) -> bool:
  """gs://... and other object-store paths (read and written through etils.epath)."""
  return "://" in os.fspath(path)


def _read_json(path: str) -> Any:
  try:
    if is_remote(path):
      return json.loads(epath.Path(path).read_text())
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _write_json_atomic(path: str, obj: Any) -> None:
  if is_remote(path):  # an object is replaced whole: already atomic
    epath.Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _get_path(tree, path: Path):
  for p in path:
    tree = tree[p]
  return tree


def _set_path(tree: dict, path: Path, value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _key_str(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _flatten(tree) -> dict[Path, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_str(k) for k in path): leaf for path, leaf in leaves}


def _unflatten(flat: Mapping[Path, Any]) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    _set_path(out, path, leaf)
  return out


def _fmt(path: Path) -> str:
  return "/".join(path)


def _short(e: BaseException, limit: int = 300) -> str:
  """`Type: message` on one line, cut short (Orbax/TensorStore messages embed whole JSON specs)."""
  msg = " ".join(str(e).split())
  return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


# ----------------------------------------------------------------------------- assets & root
def copy_assets(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
  """Copy the tokenizer/processor/chat-template/generation files of `src_dir` (top level, names in
  ASSET_PATTERNS / ASSET_DIRS) into `dst_dir`. Returns the names copied; creates `dst_dir` only if needed."""
  src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
  if not os.path.isdir(src_dir):
    return []
  copied = []
  for name in sorted(os.listdir(src_dir)):
    src = os.path.join(src_dir, name)
    is_file = os.path.isfile(src) and any(fnmatch.fnmatchcase(name, p) for p in ASSET_PATTERNS)
    is_dir = os.path.isdir(src) and name in ASSET_DIRS
    if not (is_file or is_dir):
      continue
    dst = os.path.join(dst_dir, name)
    if is_remote(dst_dir):
      epath.Path(src).copy(epath.Path(dst), overwrite=True) if is_file else _copy_tree_remote(src, dst)
      copied.append(name)
      continue
    os.makedirs(dst_dir, exist_ok=True)
    if is_dir:
      shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
      shutil.copyfile(src, dst)
    copied.append(name)
  return copied


def _copy_tree_remote(src: str, dst: str) -> None:
  for dirpath, _, files in os.walk(src):
    for f in files:
      rel = os.path.relpath(os.path.join(dirpath, f), src)
      epath.Path(os.path.join(dirpath, f)).copy(epath.Path(dst) / rel, overwrite=True)


def write_root(ckpt_dir: str | os.PathLike, hf_config: Mapping[str, Any],
               assets_from: str | os.PathLike | None = None) -> None:
  """Write ROOT/hf_config.json (validated) and copy assets from an HF dir into ROOT/hf_assets/.

  `hf_config` is the model's HF config dict (`json.load` of config.json, or `cfg.to_hf_dict()`).
  """
  Qwen25VLConfig.from_hf_dict(hf_config)  # fail now, not at export time
  ckpt_dir = os.fspath(ckpt_dir)
  epath.Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() != 0:  # one writer on a shared file system
    return
  _write_json_atomic(os.path.join(ckpt_dir, HF_CONFIG), dict(hf_config))
  if assets_from is not None:
    copy_assets(assets_from, os.path.join(ckpt_dir, HF_ASSETS))


def find_root(path: str | os.PathLike) -> str:
  """The checkpoint root for a converter output or a trainer WORKDIR (its `checkpoints/` folder)."""
  path = os.fspath(path)
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
  for cand in (path, os.path.join(path, CHECKPOINTS_SUBDIR)):
    if epath.Path(cand, HF_CONFIG).is_file():
      return cand if is_remote(cand) else os.path.abspath(cand)  # Orbax wants absolute paths
  raise CheckpointError(f"{path!r} is not an mgpo_jax checkpoint: no {HF_CONFIG} in it "
                        f"or in {os.path.join(path, CHECKPOINTS_SUBDIR)!r}")


def read_hf_config(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
  return _read_json(os.path.join(find_root(ckpt_dir), HF_CONFIG))


# ----------------------------------------------------------------------------- orbax plumbing
def params_handler() -> ocp.PyTreeCheckpointHandler:
  """Handler for item PARAMS (use it in the trainer's CheckpointManager `item_handlers`)."""
  return ocp.PyTreeCheckpointHandler(use_compression=False)


def params_save_args(state: nnx.State | Mapping[str, Any]) -> ocp.args.PyTreeSave:
  """Save args for item PARAMS: the NNX state as a pure dict of arrays."""
  pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
  return ocp.args.PyTreeSave(pure)


def _manager(root: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(root, item_handlers={PARAMS: params_handler()}, options=options)


def save_params(ckpt_dir: str | os.PathLike, state: nnx.State, hf_config: Mapping[str, Any], step: int = 0,
                assets_from: str | os.PathLike | None = None) -> str:
  """Save `state` as step `step` (item PARAMS) under the root `ckpt_dir`; returns the step directory."""
  ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
  write_root(ckpt_dir, hf_config, assets_from)
  mngr = _manager(ckpt_dir)
  try:
    mngr.save(step, args=ocp.args.Composite(**{PARAMS: params_save_args(state)}))
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return os.path.join(ckpt_dir, str(step))


def all_steps(ckpt_dir: str | os.PathLike) -> list[int]:
  """Committed steps that hold a PARAMS item, ascending."""
  root = find_root(ckpt_dir)
  steps = ocp.utils.checkpoint_steps(root)  # skips Orbax's in-progress temporary step directories
  return sorted(s for s in steps if epath.Path(root, str(s), PARAMS).is_dir())


def latest_step(ckpt_dir: str | os.PathLike) -> int | None:
  steps = all_steps(ckpt_dir)
  return steps[-1] if steps else None


def _params_dir(root: str, step: int | None) -> tuple[int, str]:
  steps = all_steps(root)
  if not steps:
    raise CheckpointError(f"{root!r} holds no complete checkpoint step with a {PARAMS!r} item")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"step {step} not found in {root!r}; available steps: {steps}")
  return step, os.path.join(root, str(step), PARAMS)


def _saved_params(params_dir: str) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of every stored array, from the Orbax metadata (nothing is read)."""
  try:
    meta = params_handler().metadata(epath.Path(params_dir))
  except Exception as e:  # orbax raises assorted types for unreadable metadata
    raise CheckpointError(f"{params_dir}: unreadable checkpoint metadata ({_short(e)})") from None
  tree = getattr(meta, "tree", meta)
  return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in _flatten(tree).items()}


def _expected_params(cfg: Qwen25VLConfig) -> dict[Path, tuple[int, ...]]:
  _, abs_state = nnx.split(params_lib.abstract_model(cfg))
  return {p: tuple(v.shape) for p, v in _flatten(nnx.to_pure_dict(abs_state)).items()}


def _check_params(saved: Mapping[Path, tuple], expected: Mapping[Path, tuple[int, ...]], where: str) -> None:
  missing = sorted(set(expected) - set(saved))
  if missing:
    raise params_lib.CheckpointMismatchError(
        f"{where}: {len(missing)} parameter(s) missing, e.g. {[_fmt(p) for p in missing[:3]]}")
  unknown = sorted(set(saved) - set(expected))
  if unknown:
    raise params_lib.CheckpointMismatchError(
        f"{where}: {len(unknown)} unexpected parameter(s), e.g. {[_fmt(p) for p in unknown[:3]]}")
  for p, shape in expected.items():
    if saved[p][0] != shape:
      raise params_lib.CheckpointMismatchError(
          f"parameter {_fmt(p)!r} has shape {saved[p][0]} in {where}, but {HF_CONFIG} expects {shape}")


def _open(ckpt_dir, step):
  root = find_root(ckpt_dir)
  step, pdir = _params_dir(root, step)
  hf_config = _read_json(os.path.join(root, HF_CONFIG))
  cfg = Qwen25VLConfig.from_hf_dict(hf_config)
  saved = _saved_params(pdir)
  _check_params(saved, _expected_params(cfg), pdir)
  return root, step, pdir, hf_config, cfg, saved


# ----------------------------------------------------------------------------- restore
def params_restore_args(abstract: nnx.State, mesh: Mesh | None = None,
                        rules: Mapping[str, str | None] = shd.RULES) -> ocp.args.PyTreeRestore:
  """Restore args for item PARAMS (for the trainer's own `CheckpointManager.restore`).

  `abstract` is an abstract NNX state (e.g. from `params.abstract_model(cfg, dtype)`): every array is
  restored with its shape and dtype (a different stored dtype is cast while reading) and with its
  NamedSharding from `sharding.state_shardings(abstract, mesh, rules)`, so each device reads only its
  shard. `mesh=None` places everything on the first device.
  """
  shardings = shd.state_shardings(abstract, mesh, rules) if mesh is not None else None
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  targets = {}
  for path, leaf in _flatten(nnx.to_pure_dict(abstract)).items():
    sharding = single if shardings is None else _get_path(shardings, path)
    sharding = getattr(sharding, "value", sharding)  # a Variable-wrapped leaf of the sharding tree
    targets[path] = jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)
  return _restore_args(targets)


def _restore_args(targets: Mapping[Path, jax.ShapeDtypeStruct]) -> ocp.args.PyTreeRestore:
  restore_args = {p: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)
                  for p, t in targets.items()}
  return ocp.args.PyTreeRestore(item=_unflatten(targets), restore_args=_unflatten(restore_args))


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
  want = dtype_of(dtype)
  args = params_restore_args(abs_state, mesh, rules)
  targets = {p: jax.ShapeDtypeStruct(t.shape, want if want is not None else saved[p][1], sharding=t.sharding)
             for p, t in _flatten(args.item).items()}
  try:
    restored = ocp.Checkpointer(params_handler()).restore(pdir, args=_restore_args(targets))
  except Exception as e:
    raise CheckpointError(f"{pdir}: cannot restore ({_short(e)})") from None
  nnx.replace_by_pure_dict(abs_state, restored)
  return cfg, hf_config, abs_state


def restore_model(ckpt_dir: str | os.PathLike, step: int | None = None, dtype=None, mesh: Mesh | None = None,
                  rules: Mapping[str, str | None] = shd.RULES) -> Qwen25VL:
  """`restore_params` merged into a ready Qwen25VL."""
  cfg, _, state = restore_params(ckpt_dir, step, dtype, mesh, rules)
  graphdef, _ = nnx.split(params_lib.abstract_model(cfg))
  return nnx.merge(graphdef, state)


def read_param(params_dir: str, path: Path, dtype=None) -> np.ndarray:
  """One stored array as a host numpy array (partial restore: nothing else is read)."""
  args = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype_of(dtype))
  try:
    out = ocp.Checkpointer(params_handler()).restore(
        params_dir, args=ocp.args.PyTreeRestore(item=_unflatten({path: 0}), restore_args=_unflatten({path: args}),
                                                partial_restore=True))
  except Exception as e:
    raise CheckpointError(f"{params_dir}: cannot read {_fmt(path)!r} ({_short(e)})") from None
  return np.asarray(_get_path(out, path))


# ----------------------------------------------------------------------------- atomic output
@contextlib.contextmanager
def _atomic_dir(dst: str | os.PathLike, overwrite: bool = False, src: str | os.PathLike | None = None):
  """Yield a temporary sibling of `dst`; on success rename it to `dst`, on any error delete it."""
  dst = os.path.abspath(os.fspath(dst))
  if src is not None and os.path.realpath(dst) == os.path.realpath(os.fspath(src)):
    raise ValueError(f"destination {dst!r} is the source directory")
  occupied = os.path.exists(dst) and not (os.path.isdir(dst) and not os.listdir(dst))
  if occupied and not overwrite:
    raise FileExistsError(f"{dst!r} already exists and is not empty (--overwrite / overwrite=True replaces it)")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(dst):
    old = tmp + ".old"
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, dst)


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
  hf_config = _read_json(os.path.join(hf_dir, "config.json"))
  cfg = Qwen25VLConfig.from_hf_dict(hf_config)
  target = dtype_of(dtype) or _source_dtype(hf_dir)
  with _atomic_dir(ckpt_dir, overwrite, src=hf_dir) as tmp:
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
    arr = read_param(pdir, rule.ours)
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
  want = dtype_of(dtype)
  out_dtypes = {p: (want if want is not None else dt) for p, (_, dt) in saved.items()}
  specs = [(key, out_dtypes[rule.ours], tuple(rule.hf_shape(cfg)))
           for rule in params_lib.active_rules(cfg) for key in params_lib.hf_keys(rule, cfg)]
  assert [s[0] for s in specs] == list(params_lib.hf_shapes(cfg)), "export order drifted from hf_shapes"
  shards = plan_shards(specs, max_bytes)
  n = len(shards)
  names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  total = sum(int(np.prod(s[2])) * np.dtype(s[1]).itemsize for s in specs)
  embed_dtype = out_dtypes[("embed",)]
  with _atomic_dir(hf_dir, overwrite, src=root) as tmp:
    bar = None
    if progress:
      from tqdm import tqdm
      bar = tqdm(total=total, desc="writing", unit="B", unit_scale=True, disable=None)
    tensors = _iter_hf(pdir, cfg, out_dtypes)
    for name, shard in zip(names, shards):
      safetensors_io.write_streaming(os.path.join(tmp, name), shard, tensors, metadata={"format": "pt"},
                                     on_write=None if bar is None else bar.update)
    if next(tensors, None) is not None:
      raise CheckpointError("internal error: more tensors than planned")
    if bar is not None:
      bar.close()
    index = {"metadata": {"total_size": total, "total_parameters": params_lib.num_params(cfg)},
             "weight_map": {s[0]: name for name, shard in zip(names, shards) for s in shard}}
    _write_json_atomic(os.path.join(tmp, "model.safetensors.index.json"), index)
    _write_json_atomic(os.path.join(tmp, "config.json"), export_config(hf_config, embed_dtype))
    copy_assets(os.path.join(root, HF_ASSETS), tmp)
  logging.info("exported step %d of %s to %s (%d file(s), %d bytes)", step, root, hf_dir, n, total)
  return os.fspath(hf_dir)
