"""Tests of mgpo_jax.rl.losses against float64 NumPy references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgpo_jax.rl import losses

AGGS = list(losses.Aggregation)
ESTS = list(losses.KLEstimator)


def _ref_token_losses(logp, old, ref, ent, adv, cfg):
  """Per-token loss, pg and clip indicator (float64, no masking)."""
  logp, old, ref, ent = (np.asarray(x, np.float64) for x in (logp, old, ref, ent))
  a = np.asarray(adv, np.float64)[:, None]
  ratio = np.exp(logp - old)
  unclipped = -a * ratio
  clipped = -a * np.clip(ratio, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
  pg = np.maximum(unclipped, clipped)
  if cfg.clip_ratio_dual is not None:
    pg = np.where(a < 0, np.minimum(pg, -a * cfg.clip_ratio_dual), pg)
  d = ref - logp
  kl = -d if cfg.kl_estimator is losses.KLEstimator.K1 else np.exp(d) - d - 1
  return pg + cfg.kl_coef * kl - cfg.entropy_coef * ent, pg, kl, clipped > unclipped, ratio


def _ref_loss(logp, old, ref, ent, adv, mask, cfg):
  tok, pg, kl, clip, ratio = _ref_token_losses(logp, old, ref, ent, adv, cfg)
  mask = np.asarray(mask, bool)
  rows = [b for b in range(mask.shape[0]) if mask[b].any()]
  if not rows:
    loss = 0.0
  elif cfg.aggregation is losses.Aggregation.TOKEN_MEAN:
    loss = tok[mask].mean()
  elif cfg.aggregation is losses.Aggregation.SEQ_MEAN:
    loss = np.mean([tok[b][mask[b]].mean() for b in rows])
  else:
    length = cfg.seq_sum_norm_len or mask.shape[1]
    loss = np.sum([tok[b][mask[b]].sum() for b in rows]) / (len(rows) * length)
  log_ratio = np.log(ratio)
  metrics = dict(pg_loss_sum=pg[mask].sum(), kl_sum=kl[mask].sum(),
                 entropy_sum=np.asarray(ent, np.float64)[mask].sum(),
                 clip_frac_sum=clip[mask].sum(), ratio_sum=ratio[mask].sum(),
                 approx_kl_sum=(ratio - 1 - log_ratio)[mask].sum(), num_tokens=mask.sum())
  return loss, metrics


def _inputs(seed, batch=6, length=9, spread=0.4):
  rng = np.random.default_rng(seed)
  old = -rng.uniform(0.1, 4.0, size=(batch, length)).astype(np.float32)
  # log-ratios of +-spread put many tokens beyond 1 +- 0.2 on both sides.
  logp = (old + rng.uniform(-spread, spread, size=old.shape)).astype(np.float32)
  ref = (old + rng.normal(scale=0.3, size=old.shape)).astype(np.float32)
  ent = rng.uniform(0.0, 3.0, size=old.shape).astype(np.float32)
  adv = rng.normal(size=batch).astype(np.float32)
  mask = rng.random(old.shape) < 0.7
  mask[1] = False  # a fully masked row
  return logp, old, ref, ent, adv, mask


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("est", ESTS)
def test_loss_and_metrics_match_reference(agg, est):
  cfg = losses.PolicyLossConfig(aggregation=agg, kl_estimator=est, kl_coef=0.05,
                                entropy_coef=0.01)
  args = _inputs(0)
  loss, metrics = losses.policy_loss(*args, cfg)
  want_loss, want_metrics = _ref_loss(*args, cfg)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
  assert set(metrics) == set(want_metrics)
  for k, v in want_metrics.items():
    np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_clip_active_on_both_sides_and_its_gradient():
  cfg = losses.PolicyLossConfig(kl_coef=0.0, entropy_coef=0.0)
  log_ratio = np.log(np.array([[1.5, 0.5, 1.5, 0.5, 1.1, 0.9]], np.float32))
  # One row per advantage sign: A > 0 clips above, A < 0 clips below.
  logp = np.concatenate([log_ratio, log_ratio]) - 1.0
  old = np.full_like(logp, -1.0)
  adv = np.array([2.0, -3.0], np.float32)
  mask = np.ones_like(logp, bool)
  (loss, metrics), grad = jax.value_and_grad(
      lambda lp: losses.policy_loss(lp, old, None, None, adv, mask, cfg), has_aux=True)(logp)
  ratio = np.exp(log_ratio[0].astype(np.float64))
  want_pg = np.stack([
      -2.0 * np.array([1.2, ratio[1], 1.2, ratio[3], ratio[4], ratio[5]]),  # clipped at 1.2
      3.0 * np.array([ratio[0], 0.8, ratio[2], 0.8, ratio[4], ratio[5]]),  # clipped at 0.8
  ])
  np.testing.assert_allclose(float(loss), want_pg.mean(), rtol=1e-6)
  assert float(metrics["clip_frac_sum"]) == 4.0
  want_grad = np.stack([-2.0 * ratio, 3.0 * ratio]) / logp.size
  want_grad[0, [0, 2]] = 0.0
  want_grad[1, [1, 3]] = 0.0
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)


def test_dual_clip_caps_negative_advantage_loss():
  cfg = losses.PolicyLossConfig(kl_coef=0.0, entropy_coef=0.0, clip_ratio_dual=3.0)
  logp = np.log(np.array([[5.0, 2.0]], np.float32))
  adv = np.array([-1.0], np.float32)
  loss, _ = losses.policy_loss(logp, np.zeros_like(logp), None, None, adv,
                               np.ones_like(logp, bool), cfg)
  np.testing.assert_allclose(float(loss), (3.0 + 2.0) / 2, rtol=1e-6)
  want, _ = _ref_loss(logp, np.zeros_like(logp), logp, np.zeros_like(logp), adv,
                      np.ones_like(logp, bool), cfg)
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def test_k1_vs_k3_values():
  logp = np.array([[-1.0, -2.0, -0.5]], np.float32)
  ref = np.array([[-1.5, -1.0, -0.5]], np.float32)
  d = ref.astype(np.float64) - logp
  np.testing.assert_allclose(losses.kl_penalty(logp, ref, losses.KLEstimator.K1), -d, rtol=1e-6)
  np.testing.assert_allclose(losses.kl_penalty(logp, ref, losses.KLEstimator.K3),
                             np.exp(d) - d - 1, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(losses.kl_penalty(logp, ref, losses.KLEstimator.K3)) >= 0)


def test_gradient_matches_analytic_token_mean():
  cfg = losses.PolicyLossConfig(kl_coef=0.1, entropy_coef=0.02)
  logp, old, ref, ent, adv, mask = _inputs(1)
  g_logp, g_ent = jax.grad(
      lambda lp, e: losses.policy_loss(lp, old, ref, e, adv, mask, cfg)[0], argnums=(0, 1))(
          logp, ent)
  _, _, _, clipped, ratio = _ref_token_losses(logp, old, ref, ent, adv, cfg)
  a = adv.astype(np.float64)[:, None]
  d_pg = np.where(clipped, 0.0, -a * ratio)
  d_kl = 1.0 - np.exp(ref.astype(np.float64) - logp)  # d/dlogp of k3
  n = mask.sum()
  np.testing.assert_allclose(np.asarray(g_logp), np.where(mask, (d_pg + 0.1 * d_kl) / n, 0.0),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_ent), np.where(mask, -0.02 / n, 0.0), rtol=1e-5)


@pytest.mark.parametrize("agg", AGGS)
def test_masked_tokens_get_exactly_zero_gradient_even_with_garbage(agg):
  cfg = losses.PolicyLossConfig(aggregation=agg)
  logp, old, ref, ent, adv, mask = _inputs(2)
  clean_loss, clean_metrics = losses.policy_loss(logp, old, ref, ent, adv, mask, cfg)
  garbage = [np.inf, -np.inf, np.nan, 1e30]
  dirty = []
  for i, x in enumerate((logp, old, ref, ent)):
    x = x.copy()
    x[~mask] = np.resize(garbage[i:] + garbage[:i], (~mask).sum())
    dirty.append(x)
  fn = lambda lp, e: losses.policy_loss(lp, dirty[1], dirty[2], e, adv, mask, cfg)
  (loss, metrics), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(dirty[0],
                                                                              dirty[3])
  np.testing.assert_allclose(float(loss), float(clean_loss), rtol=1e-6)
  for k in clean_metrics:
    np.testing.assert_allclose(float(metrics[k]), float(clean_metrics[k]), rtol=1e-6, err_msg=k)
  for g in grads:
    g = np.asarray(g)
    assert np.all(g[~mask] == 0.0)
    assert np.all(np.isfinite(g)) and np.any(g[mask] != 0.0)


@pytest.mark.parametrize("agg", AGGS)
def test_fully_masked_batch_is_zero_and_finite(agg):
  cfg = losses.PolicyLossConfig(aggregation=agg)
  logp, old, ref, ent, adv, _ = _inputs(3)
  mask = np.zeros_like(logp, bool)
  fn = lambda lp, e: losses.policy_loss(lp, old, ref, e, adv, mask, cfg)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(logp,
                                                                                          ent)
  assert float(loss) == 0.0
  assert all(np.all(np.asarray(g) == 0.0) for g in grads)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert all(np.isfinite(float(v)) for v in losses.summarize_metrics(metrics).values())


@pytest.mark.parametrize("agg", AGGS)
def test_fully_masked_row_does_not_dilute(agg):
  cfg = losses.PolicyLossConfig(aggregation=agg)
  logp, old, ref, ent, adv, mask = _inputs(4)
  assert not mask[1].any()
  keep = np.arange(len(adv)) != 1
  full, _ = losses.policy_loss(logp, old, ref, ent, adv, mask, cfg)
  trimmed, _ = losses.policy_loss(*(x[keep] for x in (logp, old, ref, ent, adv, mask)), cfg)
  np.testing.assert_allclose(float(full), float(trimmed), rtol=1e-6)


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batch_accumulation_equals_big_batch(agg):
  cfg = losses.PolicyLossConfig(aggregation=agg, seq_sum_norm_len=32)
  args = _inputs(5, batch=6)
  logp, old, ref, ent, adv, mask = args

  def loss_fn(lp, e, o, r, a, m, norm):
    return losses.policy_loss(lp, o, r, e, a, m, cfg, loss_normalizer=norm)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  (big_loss, big_metrics), big_grads = grad_fn(logp, ent, old, ref, adv, mask, None)
  norm = losses.compute_loss_normalizer(mask, cfg)
  total_loss, total_metrics, grads = 0.0, None, [[], []]
  for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):  # row 1 (all masked) sits in the first
    (loss, metrics), (g_lp, g_e) = grad_fn(logp[rows], ent[rows], old[rows], ref[rows],
                                           adv[rows], mask[rows], norm)
    total_loss += float(loss)
    total_metrics = metrics if total_metrics is None else jax.tree.map(jnp.add, total_metrics,
                                                                       metrics)
    grads[0].append(g_lp)
    grads[1].append(g_e)
  np.testing.assert_allclose(total_loss, float(big_loss), rtol=1e-5, atol=1e-7)
  for got, want in zip(grads, big_grads):
    np.testing.assert_allclose(np.concatenate(got), np.asarray(want), rtol=1e-5, atol=1e-9)
  for k in big_metrics:
    np.testing.assert_allclose(float(total_metrics[k]), float(big_metrics[k]), rtol=1e-5)
  # And the big loss is the reference one (so the normaliser is not just self-consistent).
  np.testing.assert_allclose(float(big_loss), _ref_loss(*args, cfg)[0], rtol=1e-5, atol=1e-7)


def test_loss_normalizer_values():
  mask = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]], bool)
  cfg = losses.PolicyLossConfig
  assert float(losses.compute_loss_normalizer(mask, cfg())) == 3.0
  assert float(losses.compute_loss_normalizer(mask, cfg(aggregation="seq_mean"))) == 2.0
  assert float(losses.compute_loss_normalizer(mask, cfg(aggregation="seq_sum_norm"))) == 6.0
  assert float(losses.compute_loss_normalizer(
      mask, cfg(aggregation="seq_sum_norm", seq_sum_norm_len=100))) == 200.0


def test_summarize_metrics_means():
  logp, old, ref, ent, adv, mask = _inputs(6)
  cfg = losses.PolicyLossConfig()
  _, metrics = losses.policy_loss(logp, old, ref, ent, adv, mask, cfg)
  means = losses.summarize_metrics(metrics)
  _, _, _, clipped, ratio = _ref_token_losses(logp, old, ref, ent, adv, cfg)
  np.testing.assert_allclose(float(means["clip_frac"]), clipped[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(float(means["ratio"]), ratio[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(float(means["entropy"]), ent[mask].mean(), rtol=1e-6)
  assert 0.0 < float(means["clip_frac"]) < 1.0


def test_optional_ref_and_entropy():
  logp, old, ref, ent, adv, mask = _inputs(7)
  cfg = losses.PolicyLossConfig(kl_coef=0.0, entropy_coef=0.0)
  loss, metrics = losses.policy_loss(logp, old, None, None, adv, mask, cfg)
  assert "kl_sum" not in metrics and "entropy_sum" not in metrics
  np.testing.assert_allclose(float(loss), _ref_loss(logp, old, ref, ent, adv, mask, cfg)[0],
                             rtol=1e-5)
  with pytest.raises(ValueError, match="ref_logp_BT"):
    losses.policy_loss(logp, old, None, ent, adv, mask, losses.PolicyLossConfig())
  with pytest.raises(ValueError, match="entropy_BT"):
    losses.policy_loss(logp, old, ref, None, adv, mask, losses.PolicyLossConfig())


def test_config_defaults_strings_and_validation():
  cfg = losses.PolicyLossConfig()
  assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.kl_coef, cfg.entropy_coef) == (
      0.2, 0.2, 0.01, 0.001)
  assert cfg.kl_estimator is losses.KLEstimator.K3
  assert cfg.aggregation is losses.Aggregation.TOKEN_MEAN
  assert losses.PolicyLossConfig(kl_estimator="k1").kl_estimator is losses.KLEstimator.K1
  hash(cfg)  # usable as a static jit argument
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.kl_coef = 1.0
  for bad in (dict(kl_estimator="k2"), dict(aggregation="mean"), dict(clip_ratio_low=1.0),
              dict(clip_ratio_high=-0.1), dict(kl_coef=-1.0), dict(clip_ratio_dual=0.5),
              dict(seq_sum_norm_len=0)):
    with pytest.raises(ValueError):
      losses.PolicyLossConfig(**bad)


def test_bad_shapes_raise_value_error():
  logp, old, ref, ent, adv, mask = _inputs(8)
  cfg = losses.PolicyLossConfig()
  with pytest.raises(ValueError, match="old_logp_BT"):
    losses.policy_loss(logp, old[:, :-1], ref, ent, adv, mask, cfg)
  with pytest.raises(ValueError, match="advantages_B"):
    losses.policy_loss(logp, old, ref, ent, adv[:-1], mask, cfg)
  with pytest.raises(ValueError, match="rank 2"):
    losses.policy_loss(logp[0], old[0], ref[0], ent[0], adv, mask[0], cfg)
  with pytest.raises(ValueError, match="loss_normalizer"):
    losses.policy_loss(logp, old, ref, ent, adv, mask, cfg, loss_normalizer=np.ones(2))
