"""RL maths of MGPO: advantages, policy loss and memory-lean token log-probs (pure jnp)."""

from mgpo_jax.rl.advantages import ADVANTAGE_FNS
from mgpo_jax.rl.advantages import batch_norm_advantages
from mgpo_jax.rl.advantages import dr_grpo_advantages
from mgpo_jax.rl.advantages import get_advantage_fn
from mgpo_jax.rl.advantages import grpo_advantages
from mgpo_jax.rl.advantages import register_advantage
from mgpo_jax.rl.advantages import rloo_advantages
from mgpo_jax.rl.logprobs import shift_targets
from mgpo_jax.rl.logprobs import token_logprobs_and_entropy
from mgpo_jax.rl.losses import Aggregation
from mgpo_jax.rl.losses import KLEstimator
from mgpo_jax.rl.losses import PolicyLossConfig
from mgpo_jax.rl.losses import compute_loss_normalizer
from mgpo_jax.rl.losses import kl_penalty
from mgpo_jax.rl.losses import policy_loss
from mgpo_jax.rl.losses import summarize_metrics

__all__ = [
    "ADVANTAGE_FNS",
    "Aggregation",
    "KLEstimator",
    "PolicyLossConfig",
    "batch_norm_advantages",
    "compute_loss_normalizer",
    "dr_grpo_advantages",
    "get_advantage_fn",
    "grpo_advantages",
    "kl_penalty",
    "policy_loss",
    "register_advantage",
    "rloo_advantages",
    "shift_targets",
    "summarize_metrics",
    "token_logprobs_and_entropy",
]
