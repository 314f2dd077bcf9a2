"""What the programs (training, `evaluate`, the repro) build from a config.

  make_mesh             the learner's ('data', 'fsdp', 'tensor') mesh over all devices
  load_tokenizer        the checkpoint's tokenizer, or a small one built locally into the workdir
  build_model_config    model sizes (+ the special-token ids of a locally built tokenizer)
  build_model           the initial policy (HF weights or a seeded random init), sharded on the mesh
  train_source          the TFDS (ArrayRecord) training split, built on first use by process 0
  eval_samples          this process's part of the evaluation set, decoded (+ eval_categories)
  make_policy_sampler   the sampler on this process's devices, fed the policy's weights after each update
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
from flax import nnx
from jax.sharding import Mesh

from mgpo_jax import config as config_lib
from mgpo_jax import sampling
from mgpo_jax.data import pipeline
from mgpo_jax.data import readers
from mgpo_jax.data import tfds_builder
from mgpo_jax.io import paths
from mgpo_jax.models.qwen2_5_vl import chat
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl import tokenizer as tok_lib
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from mgpo_jax.parallel import processes
from mgpo_jax.parallel import sharding as shd
from mgpo_jax.rollout import engine as engine_lib

logger = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "tokenizer"
TFDS_SUBDIR = "tfds"


# ------------------------------------------------------------------------------------------------
# Meshes.
# ------------------------------------------------------------------------------------------------


def make_mesh(config: Any) -> Mesh:
  return shd.make_mesh(config.mesh.shape)


def make_sampling_mesh(config: Any) -> Mesh:
  """This process's sampler mesh over its local devices (default: tensor-parallel over all of them)."""
  return shd.local_mesh(tuple(config.mesh.sampling_shape) or (1, 1, -1))


# ------------------------------------------------------------------------------------------------
# Tokenizer and model.
# ------------------------------------------------------------------------------------------------


def load_tokenizer(config: Any, workdir: str):
  """The tokenizer config.model.tokenizer names; "build_local" trains one into <workdir>/tokenizer once."""
  m = config.model
  if m.tokenizer == config_lib.TOKENIZER_FROM_HF_DIR:
    return tok_lib.load_tokenizer(m.hf_dir)
  if m.tokenizer == config_lib.TOKENIZER_BUILD_LOCAL:
    path = tokenizer_dir(config, workdir)
    # Built by one process on a shared folder; with a remote workdir by every host into a local cache
    # (the build is deterministic).
    builds_here = jax.process_index() == 0 or paths.is_remote(workdir)
    if builds_here:
      tok_lib.build_tokenizer_once(path, vocab_size=m.tokenizer_vocab_size)
    processes.barrier("tokenizer")
    return tok_lib.load_tokenizer(path)
  return tok_lib.load_tokenizer(m.tokenizer)


def tokenizer_dir(config: Any, workdir: str) -> str | None:
  """The folder whose tokenizer files an HF export should carry."""
  m = config.model
  if m.tokenizer == config_lib.TOKENIZER_FROM_HF_DIR:
    return m.hf_dir or None
  if m.tokenizer == config_lib.TOKENIZER_BUILD_LOCAL:
    if paths.is_remote(workdir):  # transformers reads local folders only
      return os.path.join(os.path.expanduser("~/.cache/mgpo_jax"), f"tokenizer_{m.tokenizer_vocab_size}")
    return os.path.join(workdir, TOKENIZER_SUBDIR)
  return m.tokenizer



def build_model_config(config: Any, tokenizer) -> Qwen25VLConfig:
  """Model sizes; a locally built tokenizer's special-token ids replace Qwen's (they differ)."""
  overrides = {}
  if config.model.tokenizer == config_lib.TOKENIZER_BUILD_LOCAL:
    sp = chat.special_token_ids(tokenizer)
    overrides = dict(image_token_id=sp.image_pad, video_token_id=sp.video_pad,
                     vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end,
                     bos_token_id=None, eos_token_id=sp.im_end, pad_token_id=sp.pad)
  cfg = config_lib.model_config(config, **overrides)
  if len(tokenizer) > cfg.vocab_size:
    raise config_lib.ConfigError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's "
                                 f"vocab_size={cfg.vocab_size}")
  return cfg


def hf_config(config: Any, model_cfg: Qwen25VLConfig) -> dict[str, Any]:
  """The HF config dict checkpoints carry: the checkpoint's own config.json verbatim when the weights
  come from one (exports stay faithful to it), else the model config's."""
  if config.model.init == config_lib.ModelInit.HF:
    with open(os.path.join(config.model.hf_dir, "config.json"), encoding="utf-8") as f:
      return json.load(f)
  return model_cfg.to_hf_dict()


def write_release_assets(config: Any, model_cfg: Qwen25VLConfig, tokenizer, assets_dir: str) -> None:
  """The files beside the tokenizer that make an export a complete HF release folder.

  `preprocessor_config.json`: the image processor this run feeds the model (its min/max_pixels), so that
  `AutoProcessor.from_pretrained(export)` prepares images as training did; `generation_config.json`:
  stop at <|im_end|>, pad with the tokenizer's pad token (kept when the source checkpoint brings one).
  """
  if jax.process_index() != 0:
    return
  paths.makedirs(assets_dir)
  image = config_lib.image_processor_config(config)
  paths.write_json_atomic(os.path.join(assets_dir, "preprocessor_config.json"), image.to_hf_dict())
  gen_path = os.path.join(assets_dir, "generation_config.json")
  if paths.read_bytes(gen_path) is None:
    eos = model_cfg.eos_token_id
    paths.write_json_atomic(gen_path, {"bos_token_id": model_cfg.bos_token_id, "eos_token_id": eos,
                                       "pad_token_id": tokenizer.pad_token_id, "do_sample": False})


def build_model(config: Any, model_cfg: Qwen25VLConfig, mesh: Mesh):
  """The initial policy in float32 (the learner's master copy), created directly sharded on `mesh`."""
  if config.model.init == config_lib.ModelInit.HF:
    model = params_lib.from_pretrained(config.model.hf_dir, dtype=jnp.float32, mesh=mesh)
    if model.cfg != model_cfg:
      raise config_lib.ConfigError(f"model.hf_dir {config.model.hf_dir!r} holds a different model than "
                                   f"model.size={config.model.size!r} describes")
    return model
  return params_lib.init_model(model_cfg, seed=config.train.seed, dtype=jnp.float32, mesh=mesh)


# ------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------


def train_source(config: Any, workdir: str):
  """Random-access source of the training split; process 0 builds the TFDS dataset if needed."""
  d = config.data
  data_dir = d.tfds_data_dir or os.path.join(workdir, TFDS_SUBDIR)
  if jax.process_index() == 0:
    try:
      tfds_builder.dataset_dir(data_dir, d.tfds_name)
    except ValueError:
      logger.info("building the %s dataset %r under %s", d.source, d.tfds_name, data_dir)
      builder_cfg = tfds_builder.MgpoConfig(name=d.tfds_name, source=d.source,
                                            splits={d.split: config_lib.reader_kwargs(d)})
      tfds_builder.build(builder_cfg, data_dir)
  processes.barrier("tfds")
  return tfds_builder.load_data_source(data_dir, d.tfds_name, d.split)


def eval_samples(config: Any) -> list[dict[str, Any]]:
  """This process's stride of the evaluation set (the first eval.num_samples), images decoded.

  Unusable images are skipped (logged) like in training.
  """
  e = config.eval
  records = []
  for i, sample in enumerate(readers.read_source(e.source, **config_lib.reader_kwargs(e))):
    if e.num_samples and i >= e.num_samples:
      break
    if i % jax.process_count() == jax.process_index():
      records.append(sample)
  decode = pipeline.DecodeImage(config.data.max_image_pixels)
  return [s for s in map(decode, records) if s is not None]


# ------------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------------


def make_policy_sampler(config: Any, model_cfg: Qwen25VLConfig, params: nnx.State, param_shardings: Any,
                        tokenizer) -> sampling.PolicySampler:
  """The sampler of `config.rollout`'s shapes on this process's devices (`mesh.sampling_shape`), computing
  in `model.dtype` with the table `mesh.sampling_rules`, first fed `params` (laid out by `param_shardings`)."""
  return sampling.PolicySampler(model_cfg, params, param_shardings, config_lib.compute_dtype(config),
                                config_lib.sampler_config(config), tokenizer, mesh=make_sampling_mesh(config),
                                rules=config_lib.sharding_rules(config))


def make_engine(config: Any, sampler, tokenizer, greedy: bool = False):
  return engine_lib.RolloutEngine(sampler, tokenizer, config_lib.rollout_config(config, greedy=greedy))


def eval_categories(config: Any) -> list[str]:
  """The eval set's categories (read from the records, without decoding images)."""
  e = config.eval
  cats = set()
  for i, s in enumerate(readers.read_source(e.source, **config_lib.reader_kwargs(e))):
    if e.num_samples and i >= e.num_samples:
      break
    cats.add(str(s.get("category", "")))
  return sorted(cats)
