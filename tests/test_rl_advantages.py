"""Tests of mgpo_jax.rl.advantages against float64 NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgpo_jax.rl import advantages as adv_lib

EPS = 1e-6


def _ref(name, rewards, gids, num_groups, eps=EPS):
  """Straightforward per-group loops in float64."""
  r = np.asarray(rewards, np.float64)
  gids = np.asarray(gids)
  out = np.zeros_like(r)
  valid = (gids >= 0) & (gids < num_groups)
  centered = np.zeros_like(r)
  for g in range(num_groups):
    idx = np.flatnonzero(gids == g)
    if idx.size:
      centered[idx] = r[idx] - r[idx].mean()
  for g in range(num_groups):
    idx = np.flatnonzero(gids == g)
    n = idx.size
    if n == 0:
      continue
    x = r[idx]
    if name in ("grpo", "grpo_population_std"):
      if n == 1:
        continue
      std = x.std(ddof=1 if name == "grpo" else 0)
      out[idx] = (x - x.mean()) / (std + eps)
    elif name == "dr_grpo":
      out[idx] = x - x.mean()
    elif name == "rloo":
      if n == 1:
        continue
      out[idx] = [x[i] - np.delete(x, i).mean() for i in range(n)]
    elif name == "batch_norm":
      batch_std = centered[valid].std(ddof=1) if valid.sum() > 1 else 0.0
      out[idx] = centered[idx] / (batch_std + eps)
    else:
      raise AssertionError(name)
  return out


ALL = sorted(adv_lib.ADVANTAGE_FNS)


@functools.cache
def _jitted(name):
  return jax.jit(adv_lib.get_advantage_fn(name), static_argnums=(2, 3))


def _random_batch(seed, batch=40, num_groups=7, binary=True):
  rng = np.random.default_rng(seed)
  # Unequal, shuffled (non-contiguous) groups, with padding rows (-1) and an empty group.
  gids = rng.integers(-1, num_groups - 1, size=batch).astype(np.int32)
  gids[:2] = num_groups - 3  # make sure at least one group has 2+ samples
  rewards = (rng.random(batch) < 0.5).astype(np.float32) if binary else rng.normal(
      size=batch).astype(np.float32)
  return rewards, gids


def test_registry_names():
  assert set(ALL) >= {"grpo", "grpo_population_std", "dr_grpo", "rloo", "batch_norm"}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("seed,binary", [(0, True), (1, False)])
def test_matches_numpy_reference(name, seed, binary):
  rewards, gids = _random_batch(seed, binary=binary)
  got = adv_lib.get_advantage_fn(name)(jnp.asarray(rewards), jnp.asarray(gids), 7, EPS)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _ref(name, rewards, gids, 7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_jit_with_static_num_groups(name):
  rewards, gids = _random_batch(3)
  np.testing.assert_allclose(np.asarray(_jitted(name)(rewards, gids, 7, EPS)),
                             _ref(name, rewards, gids, 7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_all_equal_groups_are_exactly_zero(name):
  # Values whose float32 group mean does not round-trip exactly (0.1 * 7 / 7 != 0.1).
  rewards = np.array([0.1] * 7 + [1e4 + 0.1] * 3 + [1.0] * 8 + [0.0, 1.0], np.float32)
  gids = np.array([0] * 7 + [1] * 3 + [2] * 8 + [3, 3], np.int32)
  perm = np.random.default_rng(0).permutation(len(rewards))
  got = np.asarray(_jitted(name)(rewards[perm], gids[perm], 4, EPS))
  assert np.all(np.isfinite(got))
  assert np.all(got[gids[perm] < 3] == 0.0)
  assert np.any(got[gids[perm] == 3] != 0.0)  # the mixed group still gets a signal


@pytest.mark.parametrize("name", ALL)
def test_singleton_groups_and_padding_give_zero_without_nan(name):
  rewards = np.array([3.0, -1.0, 1.0, 0.0, 7.0, 1.0], np.float32)
  gids = np.array([0, 1, 2, 2, -1, 9], np.int32)  # 0, 1 singletons; -1 and 9 (>= G) padding
  got = np.asarray(_jitted(name)(rewards, gids, 3, EPS))
  assert np.all(np.isfinite(got))
  assert got[0] == 0.0 and got[1] == 0.0 and got[4] == 0.0 and got[5] == 0.0
  assert got[2] > 0 and got[3] < 0


@pytest.mark.parametrize("name", ALL)
def test_padding_rows_do_not_change_real_rows(name):
  rewards, gids = _random_batch(4, binary=False)
  keep = gids >= 0
  fn = _jitted(name)
  full = np.asarray(fn(rewards, gids, 7, EPS))
  trimmed = np.asarray(fn(rewards[keep], gids[keep], 7, EPS))
  np.testing.assert_allclose(full[keep], trimmed, rtol=1e-6, atol=1e-6)
  assert np.all(full[~keep] == 0.0)


@pytest.mark.parametrize("name", ALL)
def test_permutation_equivariant(name):
  rewards, gids = _random_batch(5, binary=False)
  perm = np.random.default_rng(5).permutation(len(rewards))
  fn = _jitted(name)
  np.testing.assert_allclose(np.asarray(fn(rewards, gids, 7, EPS))[perm],
                             np.asarray(fn(rewards[perm], gids[perm], 7, EPS)),
                             rtol=1e-5, atol=1e-6)


def test_grpo_unbiased_flag():
  rewards = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
  gids = np.zeros(4, np.int32)
  unbiased = np.asarray(adv_lib.grpo_advantages(rewards, gids, 1, 0.0))
  biased = np.asarray(adv_lib.grpo_advantages(rewards, gids, 1, 0.0, unbiased=False))
  np.testing.assert_allclose(unbiased[0], 0.75 / 0.5, rtol=1e-6)  # var ddof=1: 0.75 / 3
  np.testing.assert_allclose(biased[0], 0.75 / np.sqrt(0.1875), rtol=1e-6)  # var ddof=0: 0.75 / 4


def test_rloo_is_leave_one_out():
  rewards = np.array([1.0, 0.0, 0.5, 2.0], np.float32)
  got = np.asarray(adv_lib.rloo_advantages(rewards, np.zeros(4, np.int32), 1, 0.0))
  np.testing.assert_allclose(got, [1 - 2.5 / 3, 0 - 3.5 / 3, 0.5 - 3 / 3, 2 - 1.5 / 3], rtol=1e-6)


def test_unknown_name_lists_registered():
  with pytest.raises(ValueError, match="grpo"):
    adv_lib.get_advantage_fn("nope")


def test_register_and_duplicate():
  name = "_test_zero"
  try:
    @adv_lib.register_advantage(name)
    def zero(rewards_B, group_ids_B, num_groups, eps):
      return jnp.zeros_like(rewards_B)

    assert adv_lib.get_advantage_fn(name) is zero
    with pytest.raises(ValueError, match="already registered"):
      adv_lib.register_advantage(name)(zero)
  finally:
    adv_lib.ADVANTAGE_FNS.pop(name, None)


@pytest.mark.parametrize(
    "rewards,gids,num_groups,match",
    [
        (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int32), 1, "rank 1"),
        (np.zeros(3, np.float32), np.zeros(2, np.int32), 1, "shape"),
        (np.zeros(3, np.float32), np.zeros(3, np.float32), 1, "integer"),
        (np.zeros(3, np.float32), np.zeros(3, np.int32), 0, "num_groups"),
    ],
)
def test_bad_inputs_raise_value_error(rewards, gids, num_groups, match):
  with pytest.raises(ValueError, match=match):
    adv_lib.grpo_advantages(rewards, gids, num_groups, EPS)
