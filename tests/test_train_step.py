"""The jitted learner step against a float64 NumPy reference; masks, zero gradients, accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgpo_jax.parallel import sharding as shd
from mgpo_jax.models.qwen2_5_vl import Qwen25VLConfig, VisionConfig, init_model
from mgpo_jax.rl import PolicyLossConfig
from mgpo_jax.rl.batch import TrainBatch
from mgpo_jax.learner import (Learner, LearnerConfig, OldLogpSource, OptimConfig, Precision,
                            rollout_advantages, token_loss_mask)
from mgpo_jax.testing import full_rows, random_train_batch, to_continuation


def tiny_config(vocab: int = 300) -> Qwen25VLConfig:
  """The tiny shape of tests/hf_reference.py (special ids at the top of the vocabulary)."""
  return Qwen25VLConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
      mrope_section=(2, 3, 3), rope_theta=10000.0, image_token_id=vocab - 10, video_token_id=vocab - 9,
      vision_start_token_id=vocab - 12, vision_end_token_id=vocab - 11, bos_token_id=vocab - 14,
      eos_token_id=vocab - 13,
      vision=VisionConfig(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=(1,)))


CFG = tiny_config()
N_SAMPLES = 3        # groups of 3 rows: group 2 (rows 6-8) straddles the two mini-batches
LCFG = LearnerConfig(micro_batch_size=4, num_mini_batches=2, logprob_chunk_size=16, remat=True,
                     old_logp=OldLogpSource.SAMPLER, optim=OptimConfig(learning_rate=1e-3))


def _params(seed):
  return nnx.split(init_model(CFG, seed), nnx.Param, ...)[1]


@pytest.fixture(scope="module")
def learner():
  return Learner(LCFG, CFG, shd.make_mesh((1, 1, 1), jax.devices()[:1]))


@pytest.fixture(scope="module")
def setup(learner):
  """(params, ref, batch with numpy fields, numpy reference log-probs)."""
  state = learner.init(init_model(CFG, 0))
  ref = learner.reference_params(_params(1))
  # 4 prompts x 3 samples + 4 padding rows = 16 rows = 2 mini-batches of 2 micro-batches of 4.
  batch = random_train_batch(CFG, num_prompts=4, samples_per_prompt=N_SAMPLES, seq_len=64,
                             num_padding_rows=4, seed=3)
  rewards = batch.rewards_B.copy()
  rewards[0:3] = 1.0              # all-equal group (all right)
  rewards[9:12] = 0.0             # all-equal group (all wrong)
  rewards[3:9] = [1, 0, 0, 1, 1, 0]
  loss_mask = batch.loss_mask_BT.copy()
  loss_mask[1] = 0.0              # a fully masked row inside a real group
  batch = batch.replace(rewards_B=rewards, loss_mask_BT=loss_mask)
  logp, ent = _reference_logprobs(learner.model(state.params), batch)
  ref_logp, _ = _reference_logprobs(learner.model(ref), batch)
  rng = np.random.default_rng(0)
  # Sampler log-probs near the policy's, so that ratios fall on both sides of the clip range.
  old = np.where(batch.loss_mask_BT > 0, logp + rng.uniform(-0.4, 0.4, logp.shape), 0.0)
  batch = batch.replace(old_logp_BT=old.astype(np.float32))
  return state.params, ref, batch, (logp, ent, ref_logp)


def _reference_logprobs(model, batch):
  """float64 log-prob and entropy of continuation token t (from the logits at t-1 of the WHOLE conversation,
  prefix + continuation) via the eager HF-like forward (flattened pixel_values in (row, position) order: an
  independent code path from the learner's shared-prefix forward and batched per-row vision layout)."""
  full = full_rows(batch, CFG.vision)
  pixels = [p for p in full["pixels"] if p is not None]
  grids = [g for g in full["grids"] if g is not None]
  if pixels:
    logits = model(full["ids_BT"], full["mask_BT"], np.concatenate(pixels), np.concatenate(grids))
  else:
    logits = model(full["ids_BT"], full["mask_BT"])
  ids = full["ids_BT"]
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  ls = z - np.log(np.exp(z).sum(-1, keepdims=True))
  logp, ent = np.zeros(ids.shape), np.zeros(ids.shape)
  logp[:, 1:] = np.take_along_axis(ls[:, :-1], ids[:, 1:, None], -1)[..., 0]
  ent[:, 1:] = -(np.exp(ls[:, :-1]) * ls[:, :-1]).sum(-1)
  return tuple(to_continuation(x, batch, full["offset_B"]) for x in (logp, ent))


def _np_advantages(rewards, groups, eps=1e-6):
  adv = np.zeros(len(rewards))
  for g in set(groups[groups >= 0].tolist()):
    idx = np.flatnonzero(groups == g)
    r = rewards[idx].astype(np.float64)
    if len(idx) > 1 and r.max() > r.min():
      adv[idx] = (r - r.mean()) / (r.std(ddof=1) + eps)
  return adv


def _np_mask(batch):
  m = (batch.loss_mask_BT > 0) & (batch.mask_BT > 0) & (batch.group_ids_B >= 0)[:, None]
  m[:, 0] = False
  return m


def _np_loss(logp, ent, ref_logp, old, adv, mask, cfg: PolicyLossConfig):
  ratio = np.exp(logp - old)
  a = adv[:, None]
  pg = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high))
  d = ref_logp - logp
  kl = np.exp(d) - d - 1
  tok = pg + cfg.kl_coef * kl - cfg.entropy_coef * ent
  n = mask.sum()
  clipped = (-a * np.clip(ratio, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)) > -a * ratio
  return dict(loss=tok[mask].sum() / max(n, 1), pg_loss=pg[mask].sum() / max(n, 1),
              kl=kl[mask].sum() / max(n, 1), entropy=ent[mask].sum() / max(n, 1),
              clip_frac=clipped[mask].sum() / max(n, 1), num_tokens=n)


def _grads(learner, params, ref, batch, mini_index):
  mini = learner.split_rollout(batch)[mini_index]
  return learner.grads_and_metrics(params, ref, mini, batch.rewards_B, batch.group_ids_B, mini_index)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


# ------------------------------------------------------------------------------------------------


def test_masks_and_advantages_match_numpy(setup):
  _, _, batch, _ = setup
  np.testing.assert_array_equal(np.asarray(token_loss_mask(batch)) > 0, _np_mask(batch))
  adv = np.asarray(rollout_advantages(LCFG, jnp.asarray(batch.rewards_B), jnp.asarray(batch.group_ids_B)))
  want = _np_advantages(batch.rewards_B, batch.group_ids_B)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  assert np.all(adv[0:3] == 0) and np.all(adv[9:] == 0)      # all-equal groups and padding rows
  assert np.all(adv[6:9] != 0)                               # the straddling group is not all-equal


@pytest.mark.parametrize("mini_index", [0, 1])
def test_step_loss_matches_numpy_reference(learner, setup, mini_index):
  params, ref, batch, (logp, ent, ref_logp) = setup
  grads, metrics = _grads(learner, params, ref, batch, mini_index)
  rows = slice(8 * mini_index, 8 * mini_index + 8)
  # Group statistics over the WHOLE rollout batch, then the rows of this mini-batch.
  adv = _np_advantages(batch.rewards_B, batch.group_ids_B)[rows]
  want = _np_loss(logp[rows], ent[rows], ref_logp[rows], batch.old_logp_BT[rows].astype(np.float64), adv,
                  _np_mask(batch)[rows], LCFG.loss)
  assert 0 < want["clip_frac"] < 1, "test inputs should clip some tokens but not all"
  for k, v in want.items():
    np.testing.assert_allclose(float(metrics[k]), v, rtol=2e-5, atol=2e-6, err_msg=k)
  assert np.isfinite(_flat(grads)).all() and float(metrics["grad_norm"]) > 0
  np.testing.assert_allclose(float(metrics["reward_mean"]),
                             batch.rewards_B[rows][batch.group_ids_B[rows] >= 0].mean(), rtol=1e-6)


def test_all_padding_mini_batch_is_zero_and_finite(learner, setup):
  params, ref, batch, _ = setup
  pad = lambda x, v=0: np.concatenate([x[:8], np.full_like(x[8:], v)])
  padded = batch.replace(mask_BT=pad(batch.mask_BT), loss_mask_BT=pad(batch.loss_mask_BT),
                         group_ids_B=pad(batch.group_ids_B, -1), rewards_B=pad(batch.rewards_B))
  grads, metrics = _grads(learner, params, ref, padded, 1)
  assert float(metrics["loss"]) == 0.0 and float(metrics["num_tokens"]) == 0.0
  assert np.all(_flat(grads) == 0.0)
  assert all(np.isfinite(float(v)) for v in metrics.values())


def test_update_applies_adamw_and_keeps_finite(learner, setup):
  params, ref, batch, _ = setup
  _, metrics_g = _grads(learner, params, ref, batch, 0)
  state = learner.init(nnx.merge(learner.graphdef, jax.tree.map(jnp.copy, params)))
  before = _flat(state.params)
  old_q = state.params["q"][...]
  mini = learner.split_rollout(batch)[0]
  state, metrics = learner.update(state, ref, mini, batch.rewards_B, batch.group_ids_B, 0)
  after = _flat(state.params)
  assert old_q.is_deleted()                     # the state was donated
  np.testing.assert_allclose(float(metrics["loss"]), float(metrics_g["loss"]), rtol=1e-6)
  assert int(state.step) == 1 and float(metrics["lr"]) == pytest.approx(1e-3)
  assert np.isfinite(after).all()
  # First Adam step: |update| <= lr (+ weight decay) everywhere, and most weights moved.
  assert np.max(np.abs(after - before)) <= 1e-3 * (1 + 1e-3) + 1e-3 * 0.01 * np.max(np.abs(before))
  assert np.mean(after != before) > 0.5


def test_epochs_repeat_the_updates_against_the_rollout_policy(setup):
  """num_epochs=2: twice the updates; the second pass is off-policy (its ratios are against the log-probs
  recomputed once, before the first update), so its approx KL is > 0 where the first update's is 0."""
  params, ref, batch, _ = setup
  cfg = dataclasses.replace(LCFG, num_epochs=2, old_logp=OldLogpSource.RECOMPUTE)
  two = Learner(cfg, CFG, shd.make_mesh((1, 1, 1), jax.devices()[:1]))
  state = two.init(nnx.merge(two.graphdef, jax.tree.map(jnp.copy, params)))
  state, metrics = two.train_on_rollout(state, ref, batch)
  assert int(state.step) == 4 and len(metrics) == 4
  kl = [float(m["approx_kl"]) for m in metrics]
  assert kl[0] == pytest.approx(0.0, abs=1e-7) and kl[2] > 1e-6, kl
  with pytest.raises(ValueError, match="num_epochs"):
    LearnerConfig(num_epochs=0)


def test_bf16_policy_keeps_f32_master_and_moments(learner, setup):
  params, ref, _, _ = setup
  # Text only (a cheaper compile); loss against the float64 reference of the f32 models.
  batch = random_train_batch(CFG, num_prompts=4, samples_per_prompt=N_SAMPLES, seq_len=32,
                             num_padding_rows=4, with_images=False, seed=4)
  logp, ent = _reference_logprobs(learner.model(params), batch)
  ref_logp, _ = _reference_logprobs(learner.model(ref), batch)
  cfg = dataclasses.replace(LCFG, precision=Precision.BF16, optim=OptimConfig(learning_rate=1e-6))
  bf16 = Learner(cfg, CFG, learner.mesh)
  state = bf16.init(nnx.merge(learner.graphdef, jax.tree.map(jnp.copy, params)))
  ref16 = bf16.reference_params(ref)
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(ref16)} == {jnp.dtype(jnp.bfloat16)}
  assert bf16.model(state.params).q[...].dtype == jnp.bfloat16
  # Text-only batch: the vision tower gets no gradient (and lr*wd*w is below f32 resolution), so
  # look at the language-model weights.
  text_params = lambda p: {k: v for k, v in p.items() if k != "visual"}
  before = _flat(text_params(state.params))
  state, metrics = bf16.update(state, ref16, bf16.split_rollout(batch)[0], batch.rewards_B,
                               batch.group_ids_B, 0)
  after = _flat(text_params(state.params))
  rows = slice(0, 8)
  want = _np_loss(logp[rows], ent[rows], ref_logp[rows], batch.old_logp_BT[rows].astype(np.float64),
                  _np_advantages(batch.rewards_B, batch.group_ids_B)[rows], _np_mask(batch)[rows], LCFG.loss)
  np.testing.assert_allclose(float(metrics["loss"]), want["loss"], atol=5e-3)
  np.testing.assert_allclose(float(metrics["entropy"]), want["entropy"], rtol=5e-3)
  # lr 1e-6 steps are mostly below bf16's resolution of these weights; the f32 master copy keeps them.
  moved = after != before
  assert np.mean(moved) > 0.5
  assert np.mean(after[moved].astype(jnp.bfloat16) == before[moved].astype(jnp.bfloat16)) > 0.9


def test_tokens_outside_turn_mask_get_exactly_zero_gradient(learner, setup):
  params, ref, batch, _ = setup
  rng = np.random.default_rng(1)
  # Make the tail of row 4 real (mask 1) but off the turn mask: tokens after the last sampled one.
  T = batch.input_ids_BT.shape[1]
  end = int(batch.mask_BT[4].sum())
  mask = batch.mask_BT.copy()
  mask[4, end:] = 1
  ids = batch.input_ids_BT.copy()
  ids[4, end:] = rng.integers(0, 250, T - end)
  base = batch.replace(mask_BT=mask, input_ids_BT=ids)
  g0, m0 = _grads(learner, params, ref, base, 0)

  off = ~_np_mask(base)
  garbage = np.where(off, rng.choice([np.nan, np.inf, -1e4, 7.0], size=off.shape), base.old_logp_BT)
  ids2 = ids.copy()
  ids2[4, end:] = rng.integers(0, 250, T - end)   # their policy/ref log-probs and entropies change
  row1 = batch.input_ids_BT[1].copy()             # row 1: a real row with an empty turn mask
  text = row1 < 250
  row1[text] = rng.integers(0, 250, text.sum())
  ids2[1] = row1
  pixels = np.asarray(base.vision.pixels_PC).copy()
  pixels[1] = rng.normal(size=pixels[1].shape)
  perturbed = base.replace(old_logp_BT=garbage.astype(np.float32), input_ids_BT=ids2,
                           vision=base.vision.replace(pixels_PC=pixels))
  g1, m1 = _grads(learner, params, ref, perturbed, 0)
  for k in ("loss", "pg_loss", "kl", "entropy", "num_tokens"):
    assert float(m1[k]) == float(m0[k]), k
  np.testing.assert_array_equal(_flat(g1), _flat(g0))

  # Positive controls: a token ON the mask (row 4: non-zero advantage) moves the loss and the gradient.
  # (The token nearest ratio 1, so that the shifted ratio stays inside the clip range.)
  logp = setup[3][0]
  on = np.flatnonzero(_np_mask(base)[4])
  b, t = 4, int(on[np.argmin(np.abs(logp[4, on] - base.old_logp_BT[4, on]))])
  old = base.old_logp_BT.copy()
  old[b, t] += 0.1
  g2, m2 = _grads(learner, params, ref, base.replace(old_logp_BT=old), 0)
  assert float(m2["loss"]) != float(m0["loss"])
  assert np.abs(_flat(g2) - _flat(g0)).max() > 1e-6
  ids3 = ids.copy()
  ids3[b, t] = (ids3[b, t] + 1) % 250
  g3, m3 = _grads(learner, params, ref, base.replace(input_ids_BT=ids3), 0)
  assert float(m3["kl"]) != float(m0["kl"]) and np.abs(_flat(g3) - _flat(g0)).max() > 1e-6


def test_gradient_accumulation_equals_one_big_batch(learner, setup):
  params, ref, batch, _ = setup
  # Mini-batch 0 (8 rows) as 2 micro-batches of 4 (the layout of the other tests) and as one of 8.
  big = Learner(dataclasses.replace(LCFG, micro_batch_size=8), CFG, learner.mesh)
  (g1, m1), (g2, m2) = (
      lrn.grads_and_metrics(params, ref, lrn.split_rollout(batch)[0], batch.rewards_B, batch.group_ids_B, 0)
      for lrn in (big, learner))
  np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6, atol=1e-7)
  for key in ("pg_loss", "kl", "entropy", "clip_frac", "num_tokens", "grad_norm"):
    np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(_flat(g2), _flat(g1), rtol=1e-5, atol=1e-8)
  assert np.abs(_flat(g1)).max() > 1e-4


def test_bad_configs_and_batches_raise_value_error(learner, setup):
  with pytest.raises(ValueError, match="advantage"):
    LearnerConfig(advantage_estimator="nope")
  with pytest.raises(ValueError, match="old_logp"):
    LearnerConfig(old_logp="later")
  with pytest.raises(ValueError, match="micro_batch_size"):
    LearnerConfig(micro_batch_size=0)
  _, _, batch, _ = setup
  with pytest.raises(ValueError, match="does not split"):
    learner.split_rollout(jax.tree.map(lambda x: x[:12], batch))
  with pytest.raises(ValueError, match="old_logp_BT"):
    learner.split_rollout(batch.replace(old_logp_BT=batch.old_logp_BT[:, :10]))
  with pytest.raises(ValueError, match="group_ids_B"):
    learner.split_rollout(batch.replace(group_ids_B=batch.group_ids_B + 100))
  params, ref, _, _ = setup
  with pytest.raises(ValueError, match="mini_index"):
    learner.grads_and_metrics(params, ref, learner.split_rollout(batch)[0], batch.rewards_B,
                              batch.group_ids_B, 2)
  flat_vision = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch.vision)
  with pytest.raises(ValueError, match="batched per row"):
    learner.split_rollout(batch.replace(vision=flat_vision))


def test_random_train_batch_structure():
  batch = random_train_batch(CFG, num_prompts=2, samples_per_prompt=4, seq_len=64, num_padding_rows=2, seed=1)
  assert isinstance(batch, TrainBatch)
  assert batch.input_ids_BT.shape == (10, 64) and batch.image_grid_BI3.shape == (10, 1, 3)
  np.testing.assert_array_equal(batch.group_ids_B, [0, 0, 0, 0, 1, 1, 1, 1, -1, -1])
  # One prefix per prompt (its image included), shared by the group's rows.
  assert batch.prefix_ids_GS.shape[0] == 2 and batch.prefix_grid_GI3.shape == (2, 1, 3)
  np.testing.assert_array_equal(batch.prefix_index_B[:8], [0, 0, 0, 0, 1, 1, 1, 1])
  full = full_rows(batch, CFG.vision)
  for b in range(8):
    ids, real = full["ids_BT"][b], full["mask_BT"][b] > 0
    n_tok = ((ids == CFG.image_token_id) & real).sum()
    assert n_tok == np.prod(full["grids"][b], axis=1).sum() // 4      # pads match the images
    assert len(full["grids"][b]) == 2                                   # the prompt's image and the crop
    sampled = batch.loss_mask_BT[b] > 0
    assert not sampled[0]                                               # the prompt's last token
    assert sampled.sum() == batch.turn_lengths_BK[b].sum()
    assert not np.any(batch.input_ids_BT[b][sampled] == CFG.image_token_id)
    assert (batch.input_ids_BT[b][sampled] == CFG.eos_token_id).sum() == 2    # each turn closes
    assert np.all(batch.old_logp_BT[b][sampled] < 0) and np.all(batch.old_logp_BT[b][~sampled] == 0)
  assert batch.mask_BT[8:].sum() == 0 and batch.loss_mask_BT[8:].sum() == 0
