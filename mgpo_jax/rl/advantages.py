"""Outcome advantages for group-sampled RL (GRPO and friends).

Every advantage function has the signature

    fn(rewards_B, group_ids_B, num_groups, eps) -> advantages_B

* ``rewards_B``: f32[B], one scalar reward per sampled rollout.
* ``group_ids_B``: i32[B]; rows sharing an id are the samples of one prompt. Groups need not be
  contiguous nor of equal size. Rows whose id is outside ``[0, num_groups)`` (use -1) are padding
  and get advantage 0; they never enter any statistic.
* ``num_groups``: static Python int, the number of segments.
* ``eps``: added to the standard deviation where one is used (ignored otherwise).

All functions are pure ``jnp`` code (jit/SPMD friendly). A group whose rewards are all equal gets an
advantage of exactly 0 (checked with a group max == min test, so float rounding of the mean cannot
leak a tiny non-zero value), and no input produces NaN.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, Protocol

import jax
import jax.numpy as jnp


class AdvantageFn(Protocol):

  def __call__(
      self, rewards_B: jax.Array, group_ids_B: jax.Array, num_groups: int, eps: float
  ) -> jax.Array:
    ...


ADVANTAGE_FNS: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
  """Decorator that adds an advantage function to ``ADVANTAGE_FNS`` under ``name``."""

  def decorator(fn: AdvantageFn) -> AdvantageFn:
    if name in ADVANTAGE_FNS:
      raise ValueError(f"Advantage function {name!r} is already registered.")
    ADVANTAGE_FNS[name] = fn
    return fn

  return decorator


def get_advantage_fn(name: str) -> AdvantageFn:
  """Returns the advantage function registered under ``name``."""
  try:
    return ADVANTAGE_FNS[name]
  except KeyError:
    raise ValueError(
        f"Unknown advantage function {name!r}; registered: {sorted(ADVANTAGE_FNS)}."
    ) from None


# ------------------------------------------------------------------------------------------------
# Group statistics.
# ------------------------------------------------------------------------------------------------


def _check_inputs(rewards_B, group_ids_B, num_groups) -> None:
  if jnp.ndim(rewards_B) != 1:
    raise ValueError(f"rewards_B must be rank 1 [B], got shape {jnp.shape(rewards_B)}.")
  if jnp.shape(group_ids_B) != jnp.shape(rewards_B):
    raise ValueError(
        f"group_ids_B shape {jnp.shape(group_ids_B)} != rewards_B shape {jnp.shape(rewards_B)}."
    )
  if not jnp.issubdtype(jnp.result_type(group_ids_B), jnp.integer):
    raise ValueError(f"group_ids_B must be integer, got {jnp.result_type(group_ids_B)}.")
  if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1:
    raise ValueError(f"num_groups must be a positive static Python int, got {num_groups!r}.")


class _GroupStats:
  """Per-row view of the group statistics of ``rewards_B`` (padding rows masked out)."""

  def __init__(self, rewards_B: jax.Array, group_ids_B: jax.Array, num_groups: int):
    _check_inputs(rewards_B, group_ids_B, num_groups)
    r_B = jnp.asarray(rewards_B, jnp.float32)
    gid_B = jnp.asarray(group_ids_B, jnp.int32)
    num_groups = int(num_groups)
    self.valid_B = (gid_B >= 0) & (gid_B < num_groups)
    # Padding rows are routed to segment 0 with zero weight, so no statistic depends on the
    # backend's handling of out-of-range segment ids.
    safe_gid_B = jnp.where(self.valid_B, gid_B, 0)
    r_B = jnp.where(self.valid_B, r_B, 0.0)
    segsum = functools.partial(jax.ops.segment_sum, segment_ids=safe_gid_B,
                               num_segments=num_groups)

    count_G = segsum(self.valid_B.astype(jnp.float32))
    mean_G = segsum(r_B) / jnp.maximum(count_G, 1.0)
    max_G = jax.ops.segment_max(jnp.where(self.valid_B, r_B, -jnp.inf), safe_gid_B, num_groups)
    min_G = jax.ops.segment_min(jnp.where(self.valid_B, r_B, jnp.inf), safe_gid_B, num_groups)

    self.count_B = count_G[safe_gid_B]
    # Exactly 0 for all-equal groups (and singleton groups), whatever the rounding of the mean.
    constant_B = max_G[safe_gid_B] == min_G[safe_gid_B]
    self.centered_B = jnp.where(self.valid_B & ~constant_B, r_B - mean_G[safe_gid_B], 0.0)
    self.sq_dev_G = segsum(jnp.square(self.centered_B))

  def finish(self, adv_B: jax.Array) -> jax.Array:
    return jnp.where(self.valid_B, adv_B, 0.0).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Variants.
# ------------------------------------------------------------------------------------------------


def grpo_advantages(rewards_B, group_ids_B, num_groups: int, eps: float, *,
                    unbiased: bool = True) -> jax.Array:
  """GRPO: ``(r - mean_g) / (std_g + eps)``.

  ``unbiased=True`` (ddof=1) matches verl's GRPO (``torch.std``), which the MGPO code builds on;
  ``unbiased=False`` uses the population std. A singleton group gets advantage 0 (verl would
  pass the raw reward through instead; a lone sample carries no relative signal).
  """
  stats = _GroupStats(rewards_B, group_ids_B, num_groups)
  ddof = 1.0 if unbiased else 0.0
  gid_B = jnp.where(stats.valid_B, jnp.asarray(group_ids_B, jnp.int32), 0)
  var_B = stats.sq_dev_G[gid_B] / jnp.maximum(stats.count_B - ddof, 1.0)
  adv_B = stats.centered_B / (jnp.sqrt(var_B) + eps)
  return stats.finish(jnp.where(stats.count_B > 1, adv_B, 0.0))


register_advantage("grpo")(grpo_advantages)
register_advantage("grpo_population_std")(functools.partial(grpo_advantages, unbiased=False))


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards_B, group_ids_B, num_groups: int, eps: float) -> jax.Array:
  """Dr. GRPO: ``r - mean_g`` (no std scaling; ``eps`` unused)."""
  del eps
  stats = _GroupStats(rewards_B, group_ids_B, num_groups)
  return stats.finish(stats.centered_B)


@register_advantage("rloo")
def rloo_advantages(rewards_B, group_ids_B, num_groups: int, eps: float) -> jax.Array:
  """RLOO: ``r_i - mean_{j != i} r_j``; 0 for singleton groups (``eps`` unused)."""
  del eps
  stats = _GroupStats(rewards_B, group_ids_B, num_groups)
  # r_i - (S - r_i)/(n-1) == n/(n-1) * (r_i - S/n): avoids a second subtraction of near-equal sums.
  n_B = stats.count_B
  scale_B = jnp.where(n_B > 1, n_B / jnp.maximum(n_B - 1.0, 1.0), 0.0)
  return stats.finish(scale_B * stats.centered_B)


def batch_norm_advantages(rewards_B, group_ids_B, num_groups: int, eps: float, *,
                          unbiased: bool = True) -> jax.Array:
  """REINFORCE++-baseline style: ``(r - mean_g) / (std_batch + eps)``.

  ``std_batch`` is the std of the group-centred rewards ``r - mean_g`` over all non-padding rows
  of the batch (what REINFORCE++-baseline / verl's whitening scale by; their batch mean is exactly
  0, so no second centring is needed). ``unbiased`` picks ddof=1 (verl's ``masked_whiten``) or 0.
  """
  stats = _GroupStats(rewards_B, group_ids_B, num_groups)
  ddof = 1.0 if unbiased else 0.0
  n = jnp.sum(stats.valid_B.astype(jnp.float32))
  var = jnp.sum(jnp.square(stats.centered_B)) / jnp.maximum(n - ddof, 1.0)
  return stats.finish(stats.centered_B / (jnp.sqrt(var) + eps))


register_advantage("batch_norm")(batch_norm_advantages)
