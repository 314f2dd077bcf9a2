"""The learner: optimizer, the jitted, sharded GRPO/MGPO update, and the supervised (SFT) update."""

from mgpo_jax.learner.optim import OptimConfig
from mgpo_jax.learner.optim import Schedule
from mgpo_jax.learner.optim import make_optimizer
from mgpo_jax.learner.optim import make_schedule
from mgpo_jax.learner.step import Learner
from mgpo_jax.learner.step import LearnerConfig
from mgpo_jax.learner.step import OldLogpSource
from mgpo_jax.learner.step import Precision
from mgpo_jax.learner.step import TrainState
from mgpo_jax.learner.step import rollout_advantages
from mgpo_jax.learner.step import sequence_logprobs
from mgpo_jax.learner.step import token_loss_mask

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
    "rollout_advantages",
    "sequence_logprobs",
    "token_loss_mask",
]
