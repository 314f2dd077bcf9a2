"""Checks an experiment config (configs/*.py) and turns its sections into the typed objects.

`validate(config)` runs at start-up, before anything heavy, and raises one `ConfigError` listing
every problem it finds, each prefixed by the field it concerns:

  invalid config (2 problems):
    - rl.advantage: unknown name 'grp'; known: ['batch_norm', 'dr_grpo', 'grpo', ...]
    - data.batch_size: 512 prompts is not divisible by rl.mini_batch_size=100

Checks that need the machine (device count, processes, local paths) are in
`validate_runtime(config, num_devices=..., process_count=...)`, called once JAX is initialised.

Names of choices that live in a registry or enum elsewhere (advantages, rewards, KL estimators,
loss aggregations, data sources, lr schedules, old-log-prob sources) are checked against it; the
remaining choices are the enums of this module.

The `*_config(config)` functions build the typed settings of each part (model sizes, loss, optimizer,
learner, rollout, sampler, image processor, data readers) from the sections, so that the mapping
from config fields to those settings lives in one place.
"""

from __future__ import annotations

import enum
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from mgpo_jax import learner
from mgpo_jax import rl
from mgpo_jax import sampling
from mgpo_jax.parallel import sharding
from mgpo_jax.data import readers
from mgpo_jax.data import synthetic
from mgpo_jax.models.qwen2_5_vl import chat
from mgpo_jax.models.qwen2_5_vl import config as model_config_lib
from mgpo_jax.models.qwen2_5_vl import preprocess
from mgpo_jax.rollout import engine as engine_lib
from mgpo_jax.rollout import prompts as prompts_lib
from mgpo_jax.rollout import reward as reward_lib

Qwen25VLConfig = model_config_lib.Qwen25VLConfig

SECTIONS = ("model", "mesh", "data", "image", "rollout", "rl", "optim", "train", "eval")


class ConfigError(ValueError):
  """The config cannot run; the message lists every problem found."""


class ModelInit(enum.StrEnum):
  HF = "hf"  # Weights from <model.hf_dir>.
  RANDOM = "random"  # Seeded random init.


SIZE_FROM_HF = "from_hf"
SIZE_TINY = "tiny"
# Released sizes by name (model.size), besides SIZE_FROM_HF and SIZE_TINY.
NAMED_SIZES: dict[str, Callable[[], Qwen25VLConfig]] = {
    "qwen2_5_vl_3b": Qwen25VLConfig.qwen2_5_vl_3b,
    "qwen2_5_vl_7b": Qwen25VLConfig.qwen2_5_vl_7b,
    "qwen2_5_vl_32b": Qwen25VLConfig.qwen2_5_vl_32b,
    "qwen2_5_vl_72b": Qwen25VLConfig.qwen2_5_vl_72b,
}

TOKENIZER_FROM_HF_DIR = "hf_dir"
TOKENIZER_BUILD_LOCAL = "build_local"
# Special tokens `tokenizer.build_tokenizer` adds on top of its BPE vocabulary.
NUM_LOCAL_SPECIAL_TOKENS = len(chat.SPECIAL_TOKENS)


class DType(enum.StrEnum):
  """model.dtype: the dtype of forward passes (weights and optimizer state stay float32)."""

  FLOAT32 = "float32"
  BFLOAT16 = "bfloat16"


PRECISION: dict[DType, learner.Precision] = {
    DType.FLOAT32: learner.Precision.FLOAT32,
    DType.BFLOAT16: learner.Precision.BF16,
}


class SamplingRules(enum.StrEnum):
  SAMPLING = "sampling"
  TRAINING = "training"


SHARDING_RULES: dict[SamplingRules, Mapping[str, str | None]] = {
    SamplingRules.SAMPLING: sharding.SAMPLING_RULES,
    SamplingRules.TRAINING: sharding.RULES,
}


class Optimizer(enum.StrEnum):
  ADAMW = "adamw"  # mgpo_jax.learner.make_optimizer: global-norm clipping + AdamW.


# Vision patches are 14 x 14 pixels (every released Qwen2.5-VL).
_PATCH_PIXELS = 14 * 14

_MISSING = object()


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
  if hi is None:
    return f"{'>' if lo_open else '>='} {lo}"
  if lo is None:
    return f"{'<' if hi_open else '<='} {hi}"
  return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


class _Checker:
  """Collects problems as (field, message) while reading the config defensively."""

  def __init__(self, config: Any):
    self.config = config
    self.problems: list[str] = []

  def add(self, field: str, message: str) -> None:
    self.problems.append(f"{field}: {message}")

  def get(self, field: str) -> Any:
    node = self.config
    for part in field.split("."):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError):
        self.add(field, "missing (every field is defined in configs/base.py)")
        return _MISSING
    return node

  def number(self, field: str, *, lo: float | None = None, hi: float | None = None,
             lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> Any:
    """The value of a numeric field, or _MISSING (problem recorded) if absent or out of range."""
    v = self.get(field)
    if v is _MISSING:
      return v
    kind = int if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind):
      self.add(field, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
      return _MISSING
    if not math.isfinite(v):
      self.add(field, f"must be finite, got {v!r}")
      return _MISSING
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
      self.add(field, f"must be {_range_text(lo, hi, lo_open, hi_open)}, got {v!r}")
      return _MISSING
    return v

  def integer(self, field: str, lo: int | None = None, hi: int | None = None) -> Any:
    return self.number(field, lo=lo, hi=hi, integer=True)

  def choice(self, field: str, known: Iterable[str]) -> Any:
    v = self.get(field)
    if v is _MISSING:
      return v
    known = sorted(str(k) for k in known)
    if not isinstance(v, str) or v not in known:
      self.add(field, f"unknown name {v!r}; known: {known}")
      return _MISSING
    return v

  def string(self, field: str) -> Any:
    v = self.get(field)
    if v is not _MISSING and not isinstance(v, str):
      self.add(field, f"must be a string, got {v!r}")
      return _MISSING
    return v

  def int_tuple(self, field: str) -> Any:
    v = self.get(field)
    if v is _MISSING:
      return v
    if not isinstance(v, (tuple, list)) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in v):
      self.add(field, f"must be a tuple of integers, got {v!r}")
      return _MISSING
    return tuple(v)

  def buckets(self, field: str) -> Any:
    v = self.int_tuple(field)
    if v is _MISSING:
      return v
    if not v:
      self.add(field, "must list at least one bucket")
      return _MISSING
    if v[0] < 1 or any(b <= a for a, b in zip(v, v[1:])):
      self.add(field, f"must be positive and strictly increasing, got {v}")
      return _MISSING
    return v

  def divides(self, field: str, total: Any, what: str, part_field: str, part: Any) -> None:
    if _is_int(total) and _is_int(part) and part > 0 and total % part:
      self.add(field, f"{total} is not a multiple of {part_field}={part} ({what})")


def _peek(config: Any, *path: str) -> Any:
  """config[path...] or None, recording nothing (for cross-field checks)."""
  node = config
  for part in path:
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return None
  return node


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _ok(*values: Any) -> bool:
  return all(v is not _MISSING for v in values)


def _check_mesh_shape(chk: _Checker, field: str, allow_empty: bool = False) -> None:
  shape = chk.int_tuple(field)
  if shape is _MISSING or (allow_empty and shape == ()):
    return
  if len(shape) != len(sharding.MESH_AXES):
    chk.add(field, f"must have one entry per mesh axis {sharding.MESH_AXES}, got {shape}")
  elif any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    chk.add(field, f"entries must be >= 1, with at most one -1 (= the rest), got {shape}")


def _check_model(chk: _Checker) -> None:
  size = chk.choice("model.size", [SIZE_FROM_HF, SIZE_TINY, *NAMED_SIZES])
  init = chk.choice("model.init", [m.value for m in ModelInit])
  hf_dir = chk.string("model.hf_dir")
  tokenizer = chk.string("model.tokenizer")
  chk.choice("model.dtype", [d.value for d in DType])
  chk.get("model.remat")
  tok_vocab = chk.integer("model.tokenizer_vocab_size", lo=256)
  if tokenizer is not _MISSING and not tokenizer:
    chk.add("model.tokenizer", f"is empty; use {TOKENIZER_FROM_HF_DIR!r}, "
            f"{TOKENIZER_BUILD_LOCAL!r} or a tokenizer folder")
  needs_hf_dir = [why for why, cond in (
      ("model.init='hf'", init == ModelInit.HF),
      (f"model.size={SIZE_FROM_HF!r}", size == SIZE_FROM_HF),
      (f"model.tokenizer={TOKENIZER_FROM_HF_DIR!r}", tokenizer == TOKENIZER_FROM_HF_DIR),
  ) if cond]
  if hf_dir == "" and needs_hf_dir:
    chk.add("model.hf_dir", f"is empty, but a checkpoint folder is needed by {', '.join(needs_hf_dir)}")
  if size == SIZE_TINY and init == ModelInit.HF:
    chk.add("model.init", "'hf' cannot load weights into size='tiny'; use init='random'")
  if size == SIZE_TINY:
    try:
      cfg = tiny_model_config(chk.config.model.tiny)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      chk.add("model.tiny", str(e))
    else:
      if tokenizer == TOKENIZER_BUILD_LOCAL and _ok(tok_vocab):
        need = tok_vocab + NUM_LOCAL_SPECIAL_TOKENS
        if cfg.vocab_size < need:
          chk.add("model.tiny.vocab_size", f"{cfg.vocab_size} < {need}, the size of the locally "
                  f"built tokenizer (model.tokenizer_vocab_size + {NUM_LOCAL_SPECIAL_TOKENS} specials)")


def _check_mesh(chk: _Checker) -> None:
  _check_mesh_shape(chk, "mesh.shape")
  _check_mesh_shape(chk, "mesh.sampling_shape", allow_empty=True)
  chk.choice("mesh.sampling_rules", [r.value for r in SamplingRules])


def _check_source(chk: _Checker, section: str) -> None:
  source = chk.choice(f"{section}.source", [k.value for k in readers.SourceKind])
  path = chk.string(f"{section}.path")
  chk.string(f"{section}.image_root")
  if source is _MISSING:
    return
  if source == readers.SourceKind.SYNTHETIC:
    chk.integer(f"{section}.synthetic.n", lo=1)
    chk.integer(f"{section}.synthetic.seed", lo=0)
    try:
      synthetic_config(chk.config[section])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      chk.add(f"{section}.synthetic", str(e))
  elif path == "":
    chk.add(f"{section}.path", f"is empty; source {source!r} reads its samples from a path")


def _check_data(chk: _Checker) -> None:
  _check_source(chk, "data")
  chk.string("data.tfds_data_dir")
  name = chk.string("data.tfds_name")
  if name == "":
    chk.add("data.tfds_name", "is empty; name the built dataset (one name per source and paths)")
  chk.string("data.split")
  chk.integer("data.batch_size", lo=1)
  chk.integer("data.shuffle_seed", lo=0)
  epochs = chk.get("data.num_epochs")
  if epochs is not _MISSING and epochs is not None:
    chk.integer("data.num_epochs", lo=1)
  chk.integer("data.max_image_pixels", lo=1)
  chk.integer("data.worker_count", lo=0)
  chk.integer("data.read_threads", lo=0)
  chk.integer("data.prefetch", lo=0)


def _check_image(chk: _Checker) -> None:
  lo = chk.integer("image.min_pixels", lo=1)
  hi = chk.integer("image.max_pixels", lo=1)
  if _ok(lo, hi) and lo > hi:
    chk.add("image.min_pixels", f"{lo} > image.max_pixels={hi}")


def _check_rollout(chk: _Checker) -> None:
  turns = chk.integer("rollout.max_turns", lo=1)
  if _ok(turns) and turns < 2 and _peek(chk.config, "rollout", "single_turn") is False:
    chk.add("rollout.max_turns", f"is {turns}: MGPO needs >= 2 (a grounding turn and an answer "
            "turn); rollout.single_turn=True runs the one-turn baseline")
  chk.integer("rollout.num_generations", lo=1)
  n = _peek(chk.config, "rollout", "num_generations")
  adv = _peek(chk.config, "rl", "advantage")
  if n == 1 and adv in rl.ADVANTAGE_FNS:
    chk.add("rollout.num_generations", f"is 1: a group of one sample gets advantage 0 under "
            f"{adv!r}, so nothing would be learned; use >= 2")
  chk.number("rollout.temperature", lo=0.0, lo_open=True)
  chk.number("rollout.top_p", lo=0.0, hi=1.0, lo_open=True)
  chk.integer("rollout.top_k", lo=0, hi=sampling.SamplerConfig.max_top_k)
  chk.get("rollout.train_on_forced_close")
  chk.integer("rollout.host_workers", lo=1)
  new_tokens = chk.integer("rollout.max_new_tokens", lo=1)
  prompt_b = chk.buckets("rollout.prompt_buckets")
  seq_b = chk.buckets("rollout.seq_buckets")
  patch_b = chk.buckets("rollout.patch_buckets")
  single = chk.get("rollout.single_turn")
  chk.get("rollout.lenient_bbox")
  chk.choice("rollout.reward", reward_lib.REWARD_FNS)
  chk.choice("rollout.prompt_style", prompts_lib.PROMPT_STYLES)
  chk.integer("rollout.sampling_batch_size", lo=0)
  if not _ok(turns, single):
    return
  model_turns = 1 if single else turns
  if _ok(prompt_b, seq_b, new_tokens):
    need = prompt_b[-1] + model_turns * new_tokens
    if seq_b[-1] < need:
      chk.add("rollout.seq_buckets", f"largest bucket {seq_b[-1]} < {need}, the longest prompt "
              f"({prompt_b[-1]}) plus {model_turns} turn(s) of max_new_tokens={new_tokens}")
  max_pixels = _peek(chk.config, "image", "max_pixels")  # Reported by _check_image if bad.
  if _ok(patch_b) and _is_int(max_pixels) and max_pixels > 0:
    need = model_turns * (max_pixels // _PATCH_PIXELS)
    if patch_b[-1] < need:
      chk.add("rollout.patch_buckets", f"largest bucket {patch_b[-1]} < {need} patches, "
              f"{model_turns} image(s) of image.max_pixels={max_pixels} (14x14-pixel patches)")


def _check_rl(chk: _Checker) -> None:
  chk.choice("rl.advantage", rl.ADVANTAGE_FNS)
  chk.number("rl.adv_eps", lo=0.0, lo_open=True)
  chk.choice("rl.kl_estimator", [e.value for e in rl.KLEstimator])
  chk.choice("rl.aggregation", [a.value for a in rl.Aggregation])
  chk.choice("rl.old_logp", [s.value for s in learner.OldLogpSource])
  chk.integer("rl.logprob_chunk_size", lo=1)
  chk.integer("rl.ppo_epochs", lo=1)
  batch = _peek(chk.config, "data", "batch_size")  # Range-checked by _check_data.
  mini = chk.integer("rl.mini_batch_size", lo=1)
  micro = chk.integer("rl.micro_batch_size", lo=1)
  chk.divides("data.batch_size", batch, "both in prompts", "rl.mini_batch_size", mini)
  chk.divides("rl.mini_batch_size", mini, "both in prompts", "rl.micro_batch_size", micro)
  sampling = _peek(chk.config, "rollout", "sampling_batch_size")
  if _is_int(sampling) and sampling > 0:
    chk.divides("data.batch_size", batch, "both in prompts", "rollout.sampling_batch_size", sampling)
  chk.number("rl.clip_ratio_low", lo=0.0, hi=1.0, hi_open=True)
  chk.number("rl.clip_ratio_high", lo=0.0)
  dual = chk.get("rl.clip_ratio_dual")
  if dual is not None and dual is not _MISSING:
    chk.number("rl.clip_ratio_dual", lo=1.0, lo_open=True)
  chk.number("rl.kl_coef", lo=0.0)
  chk.number("rl.entropy_coef", lo=0.0)
  norm_len = chk.get("rl.seq_sum_norm_len")
  if norm_len is not None and norm_len is not _MISSING:
    chk.integer("rl.seq_sum_norm_len", lo=1)
  chk.number("rl.log_ratio_clip", lo=0.0, lo_open=True)
  if not any(p.startswith("rl.") for p in chk.problems):
    try:  # The loss's own checks, in case they grow beyond the ones above.
      policy_loss_config(chk.config)
    except (ValueError, TypeError) as e:
      chk.add("rl", str(e))


def _check_optim(chk: _Checker) -> None:
  chk.choice("optim.name", [o.value for o in Optimizer])
  schedule = chk.choice("optim.schedule", [s.value for s in learner.Schedule])
  chk.number("optim.learning_rate", lo=0.0, lo_open=True)
  warmup = chk.integer("optim.warmup_steps", lo=0)
  decay = chk.integer("optim.decay_steps", lo=0)
  chk.number("optim.min_lr_ratio", lo=0.0, hi=1.0)
  chk.number("optim.weight_decay", lo=0.0)
  chk.number("optim.grad_clip_norm", lo=0.0)
  chk.number("optim.b1", lo=0.0, hi=1.0, hi_open=True)
  chk.number("optim.b2", lo=0.0, hi=1.0, hi_open=True)
  chk.number("optim.eps", lo=0.0, lo_open=True)
  steps = _peek(chk.config, "train", "num_steps")
  if _ok(warmup) and _is_int(steps) and warmup > steps:
    chk.add("optim.warmup_steps", f"{warmup} > train.num_steps={steps}")
  if schedule == learner.Schedule.COSINE.value and _ok(warmup, decay) and _is_int(steps):
    if (decay or steps - warmup) < 1:
      chk.add("optim.decay_steps", f"the cosine decay after {warmup} warmup steps is empty "
              f"(decay_steps={decay}, train.num_steps={steps})")


def _check_train(chk: _Checker) -> None:
  chk.integer("train.num_steps", lo=1)
  chk.integer("train.seed", lo=0)
  chk.integer("train.log_every", lo=1)
  chk.integer("train.eval_every", lo=0)
  chk.integer("train.checkpoint_every", lo=0)
  chk.integer("train.keep_checkpoints", lo=1)
  chk.integer("train.visualize_every", lo=0)
  k = chk.integer("train.num_visualize", lo=0)
  for flag in ("eval_at_end", "async_checkpoint", "export_hf_at_end"):
    chk.get(f"train.{flag}")
  batch = _peek(chk.config, "data", "batch_size")
  n = _peek(chk.config, "rollout", "num_generations")
  if _ok(k) and _is_int(batch) and _is_int(n) and k > batch * n:
    chk.add("train.num_visualize", f"{k} > the {batch * n} rollouts of a step")


def _check_eval(chk: _Checker) -> None:
  _check_source(chk, "eval")
  chk.integer("eval.num_samples", lo=0)
  chk.get("eval.greedy")
  chk.integer("eval.batch_size", lo=1)
  turns = chk.get("eval.max_turns")
  if turns is not _MISSING and turns is not None:
    chk.integer("eval.max_turns", lo=1)


_CHECKS = (_check_model, _check_mesh, _check_data, _check_image, _check_rollout, _check_rl,
           _check_optim, _check_train, _check_eval)


def _raise(problems: Sequence[str]) -> None:
  if problems:
    lines = "\n".join(f"  - {p}" for p in problems)
    raise ConfigError(f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


def validate(config: Any) -> None:
  """Raises ConfigError listing every problem of `config` (checks that need no devices)."""
  missing = [s for s in SECTIONS if s not in config]
  if missing:
    _raise([f"{s}: section missing (start from configs/base.py)" for s in missing])
  chk = _Checker(config)
  for check in _CHECKS:
    check(chk)
  _raise(chk.problems)


def validate_runtime(config: Any, *, num_devices: int, process_count: int,
                     check_paths: bool = True) -> tuple[int, ...]:
  """Checks `config` against the machine; returns the resolved training mesh shape.

  Args:
    config: a config that passed `validate`.
    num_devices: `jax.device_count()` (all processes).
    process_count: `jax.process_count()`; each process feeds batch_size / process_count prompts.
    check_paths: check that the local folders the model needs exist on this host.
  """
  problems = []
  shape = None
  try:
    shape = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
  except ValueError as e:
    problems.append(f"mesh.shape: {e}")
  if config.mesh.sampling_shape:
    try:  # Each process samples on its own devices.
      sharding.resolve_mesh_shape(config.mesh.sampling_shape, num_devices // max(process_count, 1))
    except ValueError as e:
      problems.append(f"mesh.sampling_shape: {e}")
  n = config.rollout.num_generations
  batch = config.data.batch_size
  if batch % process_count:
    problems.append(f"data.batch_size: {batch} prompts cannot be split evenly over "
                    f"{process_count} processes")
  if shape is not None:
    dp = shape[0] * shape[1]  # Rows are sharded over ('data', 'fsdp').
    rows = {
        "rl.mini_batch_size": config.rl.mini_batch_size * n,
        "rl.micro_batch_size": config.rl.micro_batch_size * n,
    }
    for field, r in rows.items():
      if r % dp:
        problems.append(f"{field}: {r} rows ({field.split('.')[-1]} x num_generations) are not "
                        f"divisible by the {dp} data-parallel shards of mesh {shape}")
  if check_paths:
    m = config.model
    if m.init == ModelInit.HF or m.size == SIZE_FROM_HF:
      if not os.path.isfile(os.path.join(m.hf_dir, "config.json")):
        problems.append(f"model.hf_dir: no config.json in {m.hf_dir!r} on this host")
    tok = m.tokenizer
    if tok not in (TOKENIZER_FROM_HF_DIR, TOKENIZER_BUILD_LOCAL) and not os.path.isdir(tok):
      problems.append(f"model.tokenizer: {tok!r} is not a folder on this host")
  _raise(problems)
  return shape


# ------------------------------------------------------------------------------------------------
# Typed objects from config sections.
# ------------------------------------------------------------------------------------------------


def tiny_model_config(tiny: Any) -> Qwen25VLConfig:
  """The Qwen25VLConfig of the explicit sizes in `config.model.tiny`."""
  vision = model_config_lib.VisionConfig(
      depth=tiny.vision_depth,
      hidden_size=tiny.vision_hidden_size,
      intermediate_size=tiny.vision_intermediate_size,
      num_heads=tiny.vision_num_heads,
      window_size=tiny.vision_window_size,
      fullatt_block_indexes=tuple(tiny.vision_fullatt_block_indexes),
      out_hidden_size=tiny.hidden_size,
  )
  return Qwen25VLConfig(
      vocab_size=tiny.vocab_size,
      hidden_size=tiny.hidden_size,
      intermediate_size=tiny.intermediate_size,
      num_layers=tiny.num_layers,
      num_heads=tiny.num_heads,
      num_kv_heads=tiny.num_kv_heads,
      mrope_section=tuple(tiny.mrope_section),
      rope_theta=tiny.rope_theta,
      tie_word_embeddings=tiny.tie_word_embeddings,
      vision=vision,
  )


def model_config(config: Any, **overrides: Any) -> Qwen25VLConfig:
  """The model sizes `config.model` names (reads <hf_dir>/config.json for size='from_hf').

  `overrides` replace fields afterwards, e.g. the special-token ids of a locally built tokenizer.
  """
  m = config.model
  if m.size == SIZE_FROM_HF:
    cfg = Qwen25VLConfig.from_pretrained(m.hf_dir)
  elif m.size == SIZE_TINY:
    cfg = tiny_model_config(m.tiny)
  elif m.size in NAMED_SIZES:
    cfg = NAMED_SIZES[m.size]()
  else:
    raise ConfigError(f"model.size: unknown name {m.size!r}")
  return cfg.replace(**overrides) if overrides else cfg


def policy_loss_config(config: Any) -> rl.PolicyLossConfig:
  r = config.rl
  return rl.PolicyLossConfig(
      clip_ratio_low=r.clip_ratio_low,
      clip_ratio_high=r.clip_ratio_high,
      clip_ratio_dual=r.clip_ratio_dual,
      kl_coef=r.kl_coef,
      kl_estimator=r.kl_estimator,
      entropy_coef=r.entropy_coef,
      aggregation=r.aggregation,
      seq_sum_norm_len=r.seq_sum_norm_len,
      log_ratio_clip=r.log_ratio_clip,
  )


def updates_per_step(config: Any) -> int:
  """Optimizer updates per training step: mini-batches per step x epochs."""
  return config.data.batch_size // config.rl.mini_batch_size * config.rl.ppo_epochs


def optim_config(config: Any) -> learner.OptimConfig:
  """The learner's OptimConfig; schedule lengths converted from training steps to updates."""
  o = config.optim
  k = updates_per_step(config)
  schedule = learner.Schedule(o.schedule)
  total = None
  if schedule is learner.Schedule.COSINE:
    decay = o.decay_steps or config.train.num_steps - o.warmup_steps
    total = (o.warmup_steps + decay) * k
  return learner.OptimConfig(
      learning_rate=o.learning_rate, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
      grad_clip_norm=o.grad_clip_norm or None, schedule=schedule,
      warmup_steps=o.warmup_steps * k, total_steps=total, min_lr_ratio=o.min_lr_ratio)


def compute_dtype(config: Any):
  """The dtype of forward passes (`model.dtype`), as the learner and the sampler use it."""
  return PRECISION[DType(config.model.dtype)].compute_dtype


def learner_config(config: Any) -> learner.LearnerConfig:
  """The learner's settings; batch sizes converted from prompts to rows (x num_generations)."""
  r = config.rl
  return learner.LearnerConfig(
      advantage_estimator=r.advantage,
      advantage_eps=r.adv_eps,
      loss=policy_loss_config(config),
      optim=optim_config(config),
      micro_batch_size=r.micro_batch_size * config.rollout.num_generations,
      num_mini_batches=config.data.batch_size // r.mini_batch_size,
      logprob_chunk_size=r.logprob_chunk_size,
      remat=config.model.remat,
      old_logp=r.old_logp,
      precision=PRECISION[DType(config.model.dtype)],
      temperature=config.rollout.temperature,
  )


def rollout_config(config: Any, image: preprocess.ImageProcessorConfig | None = None,
                   greedy: bool = False) -> engine_lib.RolloutConfig:
  """The rollout engine's settings (`image`: the checkpoint's processor, default Qwen's).

  `greedy=True` gives the evaluation variant: one greedy sample per prompt (the sampler decodes
  greedily at temperature <= 0), with eval.max_turns when set.
  """
  r = config.rollout
  mode = engine_lib.RolloutMode.SINGLE_TURN if r.single_turn else engine_lib.RolloutMode.MGPO
  max_turns = r.max_turns
  if greedy and config.eval.max_turns is not None:
    max_turns = config.eval.max_turns
  return engine_lib.RolloutConfig(
      mode=mode, max_turns=max_turns,
      num_generations=1 if greedy else r.num_generations,
      max_new_tokens=r.max_new_tokens, temperature=0.0 if greedy else r.temperature,
      top_p=r.top_p, top_k=r.top_k,
      image=image_processor_config(config, image), reward=r.reward, lenient_parse=r.lenient_bbox,
      train_on_forced_close=r.train_on_forced_close, host_workers=r.host_workers,
      prompts=prompts_lib.prompt_style(r.prompt_style))


def sampler_config(config: Any) -> sampling.SamplerConfig:
  """The sampler's static shapes: prompt chunks, one output buffer, patches, KV cache slots."""
  r = config.rollout
  return sampling.SamplerConfig(
      prompt_buckets=tuple(r.prompt_buckets), new_token_buckets=(r.max_new_tokens,),
      patch_buckets=tuple(r.patch_buckets), cache_buckets=tuple(r.seq_buckets))


def image_processor_config(
    config: Any, base: preprocess.ImageProcessorConfig | None = None
) -> preprocess.ImageProcessorConfig:
  """`base` (default: Qwen's released processor) with config.image's pixel bounds."""
  base = base or preprocess.ImageProcessorConfig()
  return base.replace(min_pixels=config.image.min_pixels, max_pixels=config.image.max_pixels)


def synthetic_config(section: Any) -> synthetic.SyntheticConfig:
  """Generator settings of `config.data` or `config.eval` (their `synthetic` sub-section)."""
  s = section.synthetic
  return synthetic.SyntheticConfig(
      image_size=tuple(s.image_size), target_size=tuple(s.target_size), categories=tuple(s.categories),
      num_choices=s.num_choices, square=s.square, pattern_period=s.pattern_period,
      sorted_choices=s.sorted_choices, colors=tuple(s.get("colors", ())),
      image_format=synthetic.ImageFormat(s.image_format))


def reader_kwargs(section: Any) -> dict[str, Any]:
  """Keyword arguments of `readers.read_source(section.source, ...)` for `config.data`/`eval`."""
  kind = readers.SourceKind(section.source)
  if kind is readers.SourceKind.SYNTHETIC:
    return {"n": section.synthetic.n, "seed": section.synthetic.seed,
            "config": synthetic_config(section)}
  if kind is readers.SourceKind.JSONL:
    return {"path": section.path}
  if kind is readers.SourceKind.VSTAR:
    return {"root": section.path}
  if kind is readers.SourceKind.MME_REALWORLD:
    return {"path": section.path, "image_root": section.image_root or None}
  raise ConfigError(f"no reader arguments known for source {kind!r}")


def sharding_rules(config: Any) -> Mapping[str, str | None]:
  """The sampler's sharding table named by `config.mesh.sampling_rules`."""
  return SHARDING_RULES[SamplingRules(config.mesh.sampling_rules)]
