"""Checks an experiment config before anything is built, and lists every problem at once.

`validate(config)` runs at start-up, before anything heavy, and raises one `ConfigError` listing
every problem it finds, each prefixed by the field it concerns:

  invalid config (2 problems):
    - rl.advantage: unknown name 'grp'; known: ['batch_norm', 'dr_grpo', 'grpo', ...]
    - data.batch_size: 512 prompts is not divisible by rl.mini_batch_size=100

Each field's own check (type, range, known names) is generated from its description in `sections.py`;
the rules below relate fields to each other. Checks that need the machine (device count, processes,
local paths) are `validate_runtime(config, num_devices=..., process_count=...)`, called once JAX is
initialised.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

from mgpo_jax import learner
from mgpo_jax import rl
from mgpo_jax.config import build
from mgpo_jax.config import sections as S
from mgpo_jax.config.fields import MISSING, Checker, ConfigError, check_fields, field_types, is_int
from mgpo_jax.data import readers
from mgpo_jax.models.qwen2_5_vl import chat
from mgpo_jax.parallel import sharding

# Special tokens `tokenizer.build_tokenizer` adds on top of its BPE vocabulary.
NUM_LOCAL_SPECIAL_TOKENS = len(chat.SPECIAL_TOKENS)
# Vision patches are 14 x 14 pixels (every released Qwen2.5-VL).
_PATCH_PIXELS = 14 * 14
_MISSING_HINT = "every field is described in mgpo_jax/config/sections.py"


def _ok(*values: Any) -> bool:
  return all(v is not MISSING for v in values)


# ------------------------------------------------------------------------------------------------
# Rules between fields, per section (each field has passed its own check when `chk.value` gives it).
# ------------------------------------------------------------------------------------------------


def _model_rules(chk: Checker) -> None:
  size, init = chk.value("model.size"), chk.value("model.init")
  hf_dir, tokenizer = chk.value("model.hf_dir"), chk.value("model.tokenizer")
  tok_vocab = chk.value("model.tokenizer_vocab_size")
  if tokenizer == "":
    chk.add("model.tokenizer", f"is empty; use {S.TOKENIZER_FROM_HF_DIR!r}, "
            f"{S.TOKENIZER_BUILD_LOCAL!r} or a tokenizer folder")
  needs_hf_dir = [why for why, cond in (
      ("model.init='hf'", init == S.ModelInit.HF),
      (f"model.size={S.SIZE_FROM_HF!r}", size == S.SIZE_FROM_HF),
      (f"model.tokenizer={S.TOKENIZER_FROM_HF_DIR!r}", tokenizer == S.TOKENIZER_FROM_HF_DIR),
  ) if cond]
  if hf_dir == "" and needs_hf_dir:
    chk.add("model.hf_dir", f"is empty, but a checkpoint folder is needed by {', '.join(needs_hf_dir)}")
  if size == S.SIZE_TINY and init == S.ModelInit.HF:
    chk.add("model.init", "'hf' cannot load weights into size='tiny'; use init='random'")
  if chk.has_problem_under("model.tiny."):
    return
  try:  # a Qwen25VLConfig's own checks (sizes that divide, rotary sections), used or not
    cfg = build.tiny_model_config(chk.config.model.tiny)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    chk.add("model.tiny", str(e))
    return
  if cfg.vision.out_hidden_size != cfg.hidden_size:
    chk.add("model.tiny.vision.out_hidden_size", f"{cfg.vision.out_hidden_size} != model.tiny.hidden_size="
            f"{cfg.hidden_size} (the vision tower's output is the decoder's input)")
  if size == S.SIZE_TINY and tokenizer == S.TOKENIZER_BUILD_LOCAL and _ok(tok_vocab):
    need = tok_vocab + NUM_LOCAL_SPECIAL_TOKENS
    if cfg.vocab_size < need:
      chk.add("model.tiny.vocab_size", f"{cfg.vocab_size} < {need}, the size of the locally "
              f"built tokenizer (model.tokenizer_vocab_size + {NUM_LOCAL_SPECIAL_TOKENS} specials)")


def _source_rules(chk: Checker, section: str) -> None:
  source, path = chk.value(f"{section}.source"), chk.value(f"{section}.path")
  if source is MISSING:
    return
  if source == readers.SourceKind.SYNTHETIC:
    if not chk.has_problem_under(f"{section}.synthetic."):
      try:
        build.synthetic_config(chk.config[section])
      except (ValueError, TypeError, KeyError, AttributeError) as e:
        chk.add(f"{section}.synthetic", str(e))
  elif source == readers.SourceKind.SCENES:
    if not chk.has_problem_under(f"{section}.scenes."):
      try:
        build.scene_config(chk.config[section])
      except ValueError as e:
        chk.add(f"{section}.scenes", str(e))
  elif path == "":
    chk.add(f"{section}.path", f"is empty; source {source!r} reads its samples from a path")


def _data_rules(chk: Checker) -> None:
  _source_rules(chk, "data")
  if chk.value("data.tfds_name") == "":
    chk.add("data.tfds_name", "is empty; name the built dataset (one name per source and paths)")


def _image_rules(chk: Checker) -> None:
  lo, hi = chk.value("image.min_pixels"), chk.value("image.max_pixels")
  if _ok(lo, hi) and lo > hi:
    chk.add("image.min_pixels", f"{lo} > image.max_pixels={hi}")


def _rollout_rules(chk: Checker) -> None:
  turns, single = chk.value("rollout.max_turns"), chk.value("rollout.single_turn")
  if _ok(turns) and turns < 2 and chk.peek("rollout.single_turn") is False:
    chk.add("rollout.max_turns", f"is {turns}: MGPO needs >= 2 (a grounding turn and an answer "
            "turn); rollout.single_turn=True runs the one-turn baseline")
  n, adv = chk.peek("rollout.num_generations"), chk.peek("rl.advantage")
  if n == 1 and adv in rl.ADVANTAGE_FNS:
    chk.add("rollout.num_generations", f"is 1: a group of one sample gets advantage 0 under "
            f"{adv!r}, so nothing would be learned; use >= 2")
  if not _ok(turns, single):
    return
  model_turns = 1 if single else turns
  prompt_b, seq_b = chk.value("rollout.prompt_buckets"), chk.value("rollout.seq_buckets")
  patch_b, new_tokens = chk.value("rollout.patch_buckets"), chk.value("rollout.max_new_tokens")
  if _ok(prompt_b, seq_b, new_tokens):
    need = prompt_b[-1] + model_turns * new_tokens
    if seq_b[-1] < need:
      chk.add("rollout.seq_buckets", f"largest bucket {seq_b[-1]} < {need}, the longest prompt "
              f"({prompt_b[-1]}) plus {model_turns} turn(s) of max_new_tokens={new_tokens}")
  max_pixels = chk.peek("image.max_pixels")  # Reported by its own check if bad.
  if _ok(patch_b) and is_int(max_pixels) and max_pixels > 0:
    need = model_turns * (max_pixels // _PATCH_PIXELS)
    if patch_b[-1] < need:
      chk.add("rollout.patch_buckets", f"largest bucket {patch_b[-1]} < {need} patches, "
              f"{model_turns} image(s) of image.max_pixels={max_pixels} (14x14-pixel patches)")


def _rl_rules(chk: Checker) -> None:
  batch = chk.value("data.batch_size")
  mini, micro = chk.value("rl.mini_batch_size"), chk.value("rl.micro_batch_size")
  chk.divides("data.batch_size", batch, "both in prompts", "rl.mini_batch_size", mini)
  chk.divides("rl.mini_batch_size", mini, "both in prompts", "rl.micro_batch_size", micro)
  sampling = chk.value("rollout.sampling_batch_size")
  if is_int(sampling) and sampling > 0:
    chk.divides("data.batch_size", batch, "both in prompts", "rollout.sampling_batch_size", sampling)
  if not chk.has_problem_under("rl."):
    try:  # The loss's own checks, in case they grow beyond the ones above.
      build.policy_loss_config(chk.config)
    except (ValueError, TypeError) as e:
      chk.add("rl", str(e))


def _optim_rules(chk: Checker) -> None:
  warmup, decay = chk.value("optim.warmup_steps"), chk.value("optim.decay_steps")
  steps = chk.value("train.num_steps")
  if _ok(warmup) and is_int(steps) and warmup > steps:
    chk.add("optim.warmup_steps", f"{warmup} > train.num_steps={steps}")
  if chk.value("optim.schedule") == learner.Schedule.COSINE.value and _ok(warmup, decay) and is_int(steps):
    if (decay or steps - warmup) < 1:
      chk.add("optim.decay_steps", f"the cosine decay after {warmup} warmup steps is empty "
              f"(decay_steps={decay}, train.num_steps={steps})")


def _train_rules(chk: Checker) -> None:
  k = chk.value("train.num_visualize")
  batch, n = chk.value("data.batch_size"), chk.value("rollout.num_generations")
  if _ok(k) and is_int(batch) and is_int(n) and k > batch * n:
    chk.add("train.num_visualize", f"{k} > the {batch * n} rollouts of a step")


def _eval_rules(chk: Checker) -> None:
  _source_rules(chk, "eval")


_RULES: Mapping[str, Callable[[Checker], None]] = {
    "model": _model_rules, "data": _data_rules, "image": _image_rules, "rollout": _rollout_rules,
    "rl": _rl_rules, "optim": _optim_rules, "train": _train_rules, "eval": _eval_rules,
}


def _raise(problems: Sequence[str]) -> None:
  if problems:
    lines = "\n".join(f"  - {p}" for p in problems)
    raise ConfigError(f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


def validate(config: Any, extra_sections: Mapping[str, type] | None = None) -> None:
  """Raises ConfigError listing every problem of `config` (checks that need no devices).

  `extra_sections` describes sections a program adds (e.g. the repro's `repro`), checked like the rest.
  """
  described = {**field_types(S.Experiment), **(extra_sections or {})}
  missing = [s for s in described if s not in config]
  if missing:
    _raise([f"{s}: section missing (start from configs/base.py)" for s in missing])
  chk = Checker(config, _MISSING_HINT)
  for name, cls in described.items():  # every field's own check first, so the rules between fields
    check_fields(chk, name, cls)        # see only valid values (no knock-on problems from a bad one)
  for name in described:
    rule = _RULES.get(name)
    if rule is not None:
      rule(chk)
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
    if m.init == S.ModelInit.HF or m.size == S.SIZE_FROM_HF:
      if not os.path.isfile(os.path.join(m.hf_dir, "config.json")):
        problems.append(f"model.hf_dir: no config.json in {m.hf_dir!r} on this host")
    tok = m.tokenizer
    if tok not in (S.TOKENIZER_FROM_HF_DIR, S.TOKENIZER_BUILD_LOCAL) and not os.path.isdir(tok):
      problems.append(f"model.tokenizer: {tok!r} is not a folder on this host")
  _raise(problems)
  return shape
