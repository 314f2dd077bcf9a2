"""The learner: optimizer and the jitted, sharded GRPO/MGPO update."""

from mgpo_jax.train.optim import OptimConfig
from mgpo_jax.train.optim import Schedule
from mgpo_jax.train.optim import make_optimizer
from mgpo_jax.train.optim import make_schedule
from mgpo_jax.train.step import Learner
from mgpo_jax.train.step import LearnerConfig
from mgpo_jax.train.step import OldLogpSource
from mgpo_jax.train.step import Precision
from mgpo_jax.train.step import TrainState
from mgpo_jax.train.step import random_train_batch
from mgpo_jax.train.step import rollout_advantages
from mgpo_jax.train.step import sequence_logprobs
from mgpo_jax.train.step import token_loss_mask

__all__ = [
    "Learner",
    "LearnerConfig",
    "OldLogpSource",
    "OptimConfig",
    "Precision",
    "Schedule",
    "TrainState",
    "make_optimizer",
    "make_schedule",
    "random_train_batch",
    "rollout_advantages",
    "sequence_logprobs",
    "token_loss_mask",
]
