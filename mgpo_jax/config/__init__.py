"""Experiment configs: every field described once (`sections`), checked (`check`), and turned into
the typed settings of each part (`build`)."""

from mgpo_jax.config.build import (compute_dtype, image_processor_config, learner_config, model_config, optim_config,
                                   parse, policy_loss_config, reader_kwargs, rollout_config, sampler_config,
                                   sharding_rules, synthetic_config, tiny_model_config, updates_per_step)
from mgpo_jax.config.check import NUM_LOCAL_SPECIAL_TOKENS, validate, validate_runtime
from mgpo_jax.config.fields import ConfigError, to_config_dict
from mgpo_jax.config.sections import (NAMED_SIZES, SECTIONS, SIZE_FROM_HF, SIZE_TINY, TOKENIZER_BUILD_LOCAL,
                                      TOKENIZER_FROM_HF_DIR, DType, ModelInit, SamplingRules, defaults)
