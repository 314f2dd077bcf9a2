"""The on-disk format of parameter checkpoints (Orbax), independent of the model.

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
and resumes with `params_restore_args(abstract_state, mesh)`. Steps must use Orbax's default naming
(`<step>`). What the model adds (checking the stored arrays against its config, restoring a ready
model, HF import and export) is `mgpo_jax.models.qwen2_5_vl.checkpoint`.

Why uncompressed, one chunk per array: Orbax then writes straight from the arrays' buffers, so saving
adds no host copy (zstd buffers a compressed copy of the whole array until it is written).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from mgpo_jax.io import paths
from mgpo_jax.parallel import sharding as shd

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


def read_json(path: str) -> Any:
  try:
    if paths.is_remote(path):
      return json.loads(epath.Path(path).read_text())
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def get_path(tree, path: Path):
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


def flatten(tree) -> dict[Path, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_str(k) for k in path): leaf for path, leaf in leaves}


def unflatten(flat: Mapping[Path, Any]) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    _set_path(out, path, leaf)
  return out


def path_str(path: Path) -> str:
  return "/".join(path)


def short_error(e: BaseException, limit: int = 300) -> str:
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
    if paths.is_remote(dst_dir):
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

  `hf_config` is the model's HF config dict (`json.load` of config.json, or `cfg.to_hf_dict()`), written
  as given (`models.qwen2_5_vl.checkpoint.write_root` checks it first).
  """
  ckpt_dir = os.fspath(ckpt_dir)
  epath.Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() != 0:  # one writer on a shared file system
    return
  paths.write_json_atomic(os.path.join(ckpt_dir, HF_CONFIG), dict(hf_config))
  if assets_from is not None:
    copy_assets(assets_from, os.path.join(ckpt_dir, HF_ASSETS))


def find_root(path: str | os.PathLike) -> str:
  """The checkpoint root for a converter output or a trainer WORKDIR (its `checkpoints/` folder)."""
  path = os.fspath(path)
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
  for cand in (path, os.path.join(path, CHECKPOINTS_SUBDIR)):
    if epath.Path(cand, HF_CONFIG).is_file():
      return cand if paths.is_remote(cand) else os.path.abspath(cand)  # Orbax wants absolute paths
  raise CheckpointError(f"{path!r} is not an mgpo_jax checkpoint: no {HF_CONFIG} in it "
                        f"or in {os.path.join(path, CHECKPOINTS_SUBDIR)!r}")


def read_hf_config(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
  return read_json(os.path.join(find_root(ckpt_dir), HF_CONFIG))


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


def params_dir(root: str, step: int | None) -> tuple[int, str]:
  steps = all_steps(root)
  if not steps:
    raise CheckpointError(f"{root!r} holds no complete checkpoint step with a {PARAMS!r} item")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"step {step} not found in {root!r}; available steps: {steps}")
  return step, os.path.join(root, str(step), PARAMS)


def saved_params(params_dir: str) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of every stored array, from the Orbax metadata (nothing is read)."""
  try:
    meta = params_handler().metadata(epath.Path(params_dir))
  except Exception as e:  # orbax raises assorted types for unreadable metadata
    raise CheckpointError(f"{params_dir}: unreadable checkpoint metadata ({short_error(e)})") from None
  tree = getattr(meta, "tree", meta)
  return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in flatten(tree).items()}


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
  for path, leaf in flatten(nnx.to_pure_dict(abstract)).items():
    sharding = single if shardings is None else get_path(shardings, path)
    sharding = getattr(sharding, "value", sharding)  # a Variable-wrapped leaf of the sharding tree
    targets[path] = jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)
  return restore_args(targets)


def restore_args(targets: Mapping[Path, jax.ShapeDtypeStruct]) -> ocp.args.PyTreeRestore:
  restore_args = {p: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)
                  for p, t in targets.items()}
  return ocp.args.PyTreeRestore(item=unflatten(targets), restore_args=unflatten(restore_args))


def read_param(params_dir: str, path: Path, dtype=None) -> np.ndarray:
  """One stored array as a host numpy array (partial restore: nothing else is read)."""
  args = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype_of(dtype))
  try:
    out = ocp.Checkpointer(params_handler()).restore(
        params_dir, args=ocp.args.PyTreeRestore(item=unflatten({path: 0}), restore_args=unflatten({path: args}),
                                                partial_restore=True))
  except Exception as e:
    raise CheckpointError(f"{params_dir}: cannot read {path_str(path)!r} ({short_error(e)})") from None
  return np.asarray(get_path(out, path))


# ----------------------------------------------------------------------------- atomic output
@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False, src: str | os.PathLike | None = None):
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
  # mkdtemp makes the folder private (0700); the result is a folder to publish: the umask's mode.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)
  if os.path.exists(dst):
    old = tmp + ".old"
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, dst)
