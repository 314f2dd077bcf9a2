"""The typed settings each part of the package takes, built from a config's sections.

The mapping from config fields to the model sizes, the loss, the optimizer, the learner, the rollout,
the sampler, the image processor and the data readers lives here, in one place. Every function reads a
checked config (`check.validate`): a `ConfigDict`, or the typed `sections.Experiment` of `parse(config)`.
"""

from __future__ import annotations

from typing import Any, Mapping

from mgpo_jax import learner
from mgpo_jax import rl
from mgpo_jax import sampling
from mgpo_jax.config import sections as S
from mgpo_jax.config.fields import ConfigError, from_config
from mgpo_jax.data import readers
from mgpo_jax.data import scenes
from mgpo_jax.data import synthetic
from mgpo_jax.models.qwen2_5_vl import preprocess
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from mgpo_jax.rollout import engine as engine_lib
from mgpo_jax.rollout import prompts as prompts_lib


def parse(config: Any) -> S.Experiment:
  """The typed, frozen sections of a checked config."""
  return from_config(S.Experiment, config)


def tiny_model_config(tiny: Any) -> Qwen25VLConfig:
  """The Qwen25VLConfig of `config.model.tiny` (whose fields are Qwen25VLConfig's own)."""
  return from_config(Qwen25VLConfig, tiny)


def model_config(config: Any, **overrides: Any) -> Qwen25VLConfig:
  """The model sizes `config.model` names (reads <hf_dir>/config.json for size='from_hf').

  `overrides` replace fields afterwards, e.g. the special-token ids of a locally built tokenizer.
  """
  m = config.model
  if m.size == S.SIZE_FROM_HF:
    cfg = Qwen25VLConfig.from_pretrained(m.hf_dir)
  elif m.size == S.SIZE_TINY:
    cfg = tiny_model_config(m.tiny)
  elif m.size in S.NAMED_SIZES:
    cfg = S.NAMED_SIZES[m.size]()
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
  return S.PRECISION[S.DType(config.model.dtype)].compute_dtype


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
      num_epochs=r.ppo_epochs,
      logprob_chunk_size=r.logprob_chunk_size,
      remat=config.model.remat,
      old_logp=r.old_logp,
      precision=S.PRECISION[S.DType(config.model.dtype)],
      temperature=config.rollout.temperature,
      share_prefix=r.share_prefix,
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
      prompts=prompts_lib.prompt_style(r.prompt_style), random_crop=r.random_crop)


def sampler_config(config: Any) -> sampling.SamplerConfig:
  """The sampler's static shapes: prompt chunks, one output buffer, patches, KV cache slots."""
  r = config.rollout
  return sampling.SamplerConfig(
      prompt_buckets=tuple(r.prompt_buckets), new_token_buckets=(r.max_new_tokens,),
      patch_buckets=tuple(r.patch_buckets), cache_buckets=tuple(r.seq_buckets), share_prompts=r.share_prompts)


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
      num_choices=s.num_choices, square=s.square,
      sorted_choices=s.sorted_choices, colors=tuple(s.colors),
      image_format=synthetic.ImageFormat(s.image_format))


def scene_config(section: Any) -> scenes.SceneConfig:
  """Scene settings of `config.data` or `config.eval` (their `scenes` sub-section)."""
  s = section.scenes
  return scenes.SceneConfig(input_side=s.input_side, scale=s.scale, num_objects=s.num_objects,
                            object_side=s.object_side, dot_side=s.dot_side, lattice=s.lattice, jitter=s.jitter,
                            ring=s.ring)


def reader_kwargs(section: Any) -> dict[str, Any]:
  """Keyword arguments of `readers.read_source(section.source, ...)` for `config.data`/`eval`."""
  kind = readers.SourceKind(section.source)
  if kind is readers.SourceKind.SYNTHETIC:
    return {"n": section.synthetic.n, "seed": section.synthetic.seed,
            "config": synthetic_config(section)}
  if kind is readers.SourceKind.SCENES:
    return {"n": section.scenes.n, "seed": section.scenes.seed, "config": scene_config(section)}
  if kind is readers.SourceKind.JSONL:
    return {"path": section.path}
  if kind is readers.SourceKind.VSTAR:
    return {"root": section.path}
  if kind is readers.SourceKind.MME_REALWORLD:
    return {"path": section.path, "image_root": section.image_root or None}
  if kind is readers.SourceKind.HRBENCH:
    return {"path": section.path}
  if kind is readers.SourceKind.MGPO_PARQUET:
    return {"path": section.path, "path_prefix": section.path_prefix}
  raise ConfigError(f"no reader arguments known for source {kind!r}")


def sharding_rules(config: Any) -> Mapping[str, str | None]:
  """The sampler's sharding table named by `config.mesh.sampling_rules`."""
  return S.SHARDING_RULES[S.SamplingRules(config.mesh.sampling_rules)]
