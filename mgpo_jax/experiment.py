"""What the trainer (`train/loop.py`) and the evaluator (`evaluate.py`) build from a config.

  init_distributed      jax.distributed on several hosts (TPU pods: auto-detected; CPU tests: flags)
  make_mesh             the learner's ('data', 'fsdp', 'tensor') mesh over all devices
  load_tokenizer        the checkpoint's tokenizer, or a small one built locally into the workdir
  build_model_config    model sizes (+ the special-token ids of a locally built tokenizer)
  train_source          the TFDS (ArrayRecord) training split, built on first use by process 0
  eval_samples          this process's part of the evaluation set, decoded
  PolicySampler         the sampler on this process's devices, fed the learner's weights after each update
  make_engine           the multi-turn rollout engine (MGPO or the single-turn GRPO baseline)

Rollouts are process-local: each host samples its own prompts with its own copy of the policy,
tensor-parallel over its local devices (`mesh.sampling_shape`, `mesh.sampling_rules`), so decoding
never waits on another host. The learner's update is one SPMD program over all devices.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mgpo_jax import checkpoint as ckpt_lib
from mgpo_jax import config_schema as schema_lib
from mgpo_jax import sharding as shd
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig

logger = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "tokenizer"
TFDS_SUBDIR = "tfds"


# ------------------------------------------------------------------------------------------------
# Processes and meshes.
# ------------------------------------------------------------------------------------------------


def init_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Joins the other processes of a multi-host run (a no-op for a single process).

  With a coordinator address (CPU tests, GPU clusters) the three values are given explicitly; on a
  TPU pod slice `jax.distributed.initialize()` finds them itself (TPU_WORKER_HOSTNAMES lists >1 host).
  """
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < "
                       f"num_processes, got {num_processes} and {process_id}")
    # Cross-process collectives of the CPU backend (tests); no effect on TPU/GPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  elif len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    jax.distributed.initialize()


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def make_mesh(config: Any) -> Mesh:
  shape = schema_lib.resolve_mesh_shape(config.mesh.shape, jax.device_count())
  return shd.make_mesh(shape)


def make_sampling_mesh(config: Any) -> Mesh:
  """This process's sampler mesh over its local devices (default: tensor-parallel over all of them)."""
  local = jax.local_devices()
  shape = tuple(config.mesh.sampling_shape) or (1, 1, -1)
  shape = schema_lib.resolve_mesh_shape(shape, len(local))
  return Mesh(np.asarray(local).reshape(shape), shd.MESH_AXES)


# ------------------------------------------------------------------------------------------------
# Tokenizer and model.
# ------------------------------------------------------------------------------------------------


def load_tokenizer(config: Any, workdir: str):
  """The tokenizer config.model.tokenizer names; "build_local" trains one into <workdir>/tokenizer once."""
  from mgpo_jax import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top  # loads transformers

  m = config.model
  if m.tokenizer == schema_lib.TOKENIZER_FROM_HF_DIR:
    return tok_lib.load_tokenizer(m.hf_dir)
  if m.tokenizer == schema_lib.TOKENIZER_BUILD_LOCAL:
    path = tokenizer_dir(config, workdir)
    # Built by one process on a shared folder; with a remote workdir by every host into a local cache
    # (the build is deterministic).
    builds_here = jax.process_index() == 0 or ckpt_lib.is_remote(workdir)
    if builds_here and not os.path.isfile(os.path.join(path, "tokenizer.json")):
      tmp = f"{path}.tmp-{os.getpid()}"
      tok_lib.build_tokenizer(tmp, vocab_size=m.tokenizer_vocab_size)
      os.replace(tmp, path)  # a killed build never leaves a half-written tokenizer
    barrier("tokenizer")
    return tok_lib.load_tokenizer(path)
  return tok_lib.load_tokenizer(m.tokenizer)


def tokenizer_dir(config: Any, workdir: str) -> str | None:
  """The folder whose tokenizer files an HF export should carry."""
  m = config.model
  if m.tokenizer == schema_lib.TOKENIZER_FROM_HF_DIR:
    return m.hf_dir or None
  if m.tokenizer == schema_lib.TOKENIZER_BUILD_LOCAL:
    if ckpt_lib.is_remote(workdir):  # transformers reads local folders only
      return os.path.join(os.path.expanduser("~/.cache/mgpo_jax"), f"tokenizer_{m.tokenizer_vocab_size}")
    return os.path.join(workdir, TOKENIZER_SUBDIR)
  return m.tokenizer



def build_model_config(config: Any, tokenizer) -> Qwen25VLConfig:
  """Model sizes; a locally built tokenizer's special-token ids replace Qwen's (they differ)."""
  from mgpo_jax import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top

  overrides = {}
  if config.model.tokenizer == schema_lib.TOKENIZER_BUILD_LOCAL:
    sp = tok_lib.special_token_ids(tokenizer)
    overrides = dict(image_token_id=sp.image_pad, video_token_id=sp.video_pad,
                     vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end,
                     bos_token_id=None, eos_token_id=sp.im_end, pad_token_id=sp.pad)
  cfg = schema_lib.model_config(config, **overrides)
  if len(tokenizer) > cfg.vocab_size:
    raise schema_lib.ConfigError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's "
                                 f"vocab_size={cfg.vocab_size}")
  return cfg


def hf_config(config: Any, model_cfg: Qwen25VLConfig) -> dict[str, Any]:
  """The HF config dict checkpoints carry: the checkpoint's own config.json verbatim when the weights
  come from one (exports stay faithful to it), else the model config's."""
  if config.model.init == schema_lib.ModelInit.HF:
    with open(os.path.join(config.model.hf_dir, "config.json"), encoding="utf-8") as f:
      return json.load(f)
  return model_cfg.to_hf_dict()


def build_model(config: Any, model_cfg: Qwen25VLConfig, mesh: Mesh):
  """The initial policy in float32 (the learner's master copy), created directly sharded on `mesh`."""
  if config.model.init == schema_lib.ModelInit.HF:
    model = params_lib.from_pretrained(config.model.hf_dir, dtype=jnp.float32, mesh=mesh)
    if model.cfg != model_cfg:
      raise schema_lib.ConfigError(f"model.hf_dir {config.model.hf_dir!r} holds a different model than "
                                   f"model.size={config.model.size!r} describes")
    return model
  return params_lib.init_model(model_cfg, seed=config.train.seed, dtype=jnp.float32, mesh=mesh)


# ------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------


def train_source(config: Any, workdir: str):
  """Random-access source of the training split; process 0 builds the TFDS dataset if needed."""
  from mgpo_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top

  d = config.data
  data_dir = d.tfds_data_dir or os.path.join(workdir, TFDS_SUBDIR)
  if jax.process_index() == 0:
    try:
      tfds_builder.dataset_dir(data_dir, d.tfds_name)
    except ValueError:
      logger.info("building the %s dataset %r under %s", d.source, d.tfds_name, data_dir)
      builder_cfg = tfds_builder.MgpoConfig(name=d.tfds_name, source=d.source,
                                            splits={d.split: schema_lib.reader_kwargs(d)})
      tfds_builder.build(builder_cfg, data_dir)
  barrier("tfds")
  return tfds_builder.load_data_source(data_dir, d.tfds_name, d.split)


def eval_samples(config: Any) -> list[dict[str, Any]]:
  """This process's stride of the evaluation set (the first eval.num_samples), images decoded.

  Unusable images are skipped (logged) like in training.
  """
  from mgpo_jax.data import pipeline, readers  # pylint: disable=g-import-not-at-top

  e = config.eval
  records = []
  for i, sample in enumerate(readers.read_source(e.source, **schema_lib.reader_kwargs(e))):
    if e.num_samples and i >= e.num_samples:
      break
    if i % jax.process_count() == jax.process_index():
      records.append(sample)
  decode = pipeline.DecodeImage(config.data.max_image_pixels)
  return [s for s in map(decode, records) if s is not None]


# ------------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------------


class PolicySampler:
  """A `Sampler` on this process's devices that follows the learner's weights.

  `update(params)` moves the learner's float32, FSDP-sharded weights into the sampler's layout: cast
  to the compute dtype, resharded over the global mesh with the sampling rules (each process's
  devices then hold a complete tensor-parallel copy; no device ever holds the full float32 model),
  and re-wrapped as arrays of the process-local sampling mesh.
  """

  def __init__(self, config: Any, learner, tokenizer, params: nnx.State):
    from mgpo_jax import sampling  # pylint: disable=g-import-not-at-top

    self.learner = learner
    self.local_mesh = make_sampling_mesh(config)
    rules = schema_lib.sharding_rules(config)
    dtype = learner.cfg.precision.compute_dtype
    local_shape = self.local_mesh.devices.shape
    if jax.process_count() == 1:
      self.global_mesh = self.local_mesh
    else:
      # One row of the 'data' axis per process, laid out like each process's local mesh.
      per_process = [np.asarray([d for d in jax.devices() if d.process_index == p]).reshape(local_shape)
                     for p in range(jax.process_count())]
      self.global_mesh = Mesh(np.concatenate(per_process, axis=0), shd.MESH_AXES)
    _, abs_params = nnx.split(params_lib.abstract_model(learner.model_cfg, dtype))
    self.global_shardings = shd.state_shardings(abs_params, self.global_mesh, rules)
    self.local_shardings = shd.state_shardings(abs_params, self.local_mesh, rules)
    self._cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                         in_shardings=(learner.param_shardings,), out_shardings=learner.param_shardings)
    self.sampler = sampling.Sampler(self._to_model(params), schema_lib.sampler_config(config), tokenizer)

  def _to_model(self, params: nnx.State):
    cast = self._cast(params)
    placed = jax.device_put(cast, self.global_shardings)
    del cast
    if jax.process_count() > 1:
      leaves, treedef = jax.tree.flatten(placed)
      shardings = jax.tree.leaves(self.local_shardings)
      placed = jax.tree.unflatten(treedef, [
          jax.make_array_from_single_device_arrays(x.shape, s, [shard.data for shard in x.addressable_shards])
          for x, s in zip(leaves, shardings, strict=True)])
    return nnx.merge(self.learner.graphdef, placed)

  def update(self, params: nnx.State) -> None:
    self.sampler.update(self._to_model(params))


def make_engine(config: Any, sampler, tokenizer, greedy: bool = False):
  from mgpo_jax.rollout import engine as engine_lib  # pylint: disable=g-import-not-at-top

  return engine_lib.RolloutEngine(sampler, tokenizer, schema_lib.rollout_config(config, greedy=greedy))
