"""The shared-prefix learner (each prompt encoded once per device, `LearnerConfig.share_prefix`) against the
unshared one (every row its own copy of its prompt, same layout and program) and against a per-row forward
over the whole conversation (float32, tiny random model).

The batch: 3 groups of 3 rows, each group sharing a prompt with its image (mixed image sizes), with 1, 2
and 3 turns (later turns carry their own crop images, of mixed sizes), and 3 padding rows; micro-batches
of 4 rows, so groups straddle micro-batches.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgpo_jax.learner import (Learner, LearnerConfig, OldLogpSource, OptimConfig, rollout_advantages,
                              token_loss_mask)
from mgpo_jax.models.qwen2_5_vl import init_model, rope_index
from mgpo_jax.models.qwen2_5_vl.model import prefix_rows
from mgpo_jax.models.qwen2_5_vl.vision import prepare_vision_batch
from mgpo_jax.rl.logprobs import shift_targets, token_logprobs_and_entropy
from mgpo_jax.rl.losses import policy_loss
from mgpo_jax.parallel import sharding as shd
from mgpo_jax.rollout.trajectory import layout_sizes, to_train_batch
from mgpo_jax.testing import full_rows, random_trajectories, to_continuation
from test_train_step import tiny_config

CFG = tiny_config()
LCFG = LearnerConfig(micro_batch_size=4, num_mini_batches=1, logprob_chunk_size=16, remat=True,
                     old_logp=OldLogpSource.SAMPLER, optim=OptimConfig(learning_rate=1e-3))
@pytest.fixture(scope="module")
def setup():
  mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  learners = {share: Learner(dataclasses.replace(LCFG, share_prefix=share), CFG, mesh) for share in (True, False)}
  params = learners[True].init(init_model(CFG, 0)).params
  ref = learners[True].reference_params(nnx.split(init_model(CFG, 1), nnx.Param, ...)[1])
  return learners, params, ref


def _batch():
  """Group k has k + 1 turns."""
  trajs = []
  for k in range(3):
    for tr in random_trajectories(CFG, num_prompts=1, samples_per_prompt=3, seq_len=(40, 48, 64)[k],
                                  num_turns=k + 1, seed=k):
      tr.sample_index = k
      trajs.append(tr)
  sizes = layout_sizes(trajs, CFG.vision, CFG.image_token_id)
  batch = to_train_batch(trajs, [t.sample_index for t in trajs], seq_bucket=sizes.tokens, patch_bucket=48,
                         max_images=2, pad_id=0, vision_cfg=CFG.vision, max_turns=3, num_rows=12,
                         image_token_id=CFG.image_token_id, prefix_bucket=-(-sizes.prefix_tokens // 8) * 8,
                         prefix_patch_bucket=24, prefix_max_images=1)
  rewards = batch.rewards_B.copy()
  rewards[:9] = [1, 0, 0, 1, 1, 0, 0, 1, 1]   # no all-equal group: every real row has an advantage
  return batch.replace(rewards_B=rewards)


@pytest.fixture(scope="module")
def batch():
  return _batch()


def _whole_conversation(learner, params, ref, batch):
  """The loss, its gradient and the per-token log-probs [B, T] through the plain per-row forward over each
  whole conversation (`Qwen25VL.forward`, no prefix sharing, batched vision layout): an independent path."""
  full = full_rows(batch, CFG.vision)
  vision, grid = prepare_vision_batch(full["pixels"], full["grids"], CFG.vision, pad_to=72, max_images=3)
  ids, mask = jnp.asarray(full["ids_BT"]), jnp.asarray(full["mask_BT"])
  at_BT = jnp.asarray(full["offset_B"][:, None] + np.arange(batch.input_ids_BT.shape[1]))
  adv_B = rollout_advantages(LCFG, jnp.asarray(batch.rewards_B), jnp.asarray(batch.group_ids_B))
  mask_BT = token_loss_mask(jax.tree.map(jnp.asarray, batch))

  def logp(p, with_entropy):
    model = nnx.merge(learner.graphdef, p)
    h, _ = model.forward(ids, mask, rope_index(ids, mask, grid, CFG)[0], jax.tree.map(jnp.asarray, vision))
    lp, ent = token_logprobs_and_entropy(h, model.lm_head_weight(), shift_targets(ids)[0], chunk_size=16,
                                         compute_entropy=with_entropy)
    # Logits at t - 1 predict token t; then the continuation's positions.
    pick = lambda x: jnp.take_along_axis(jnp.pad(x[:, :-1], ((0, 0), (1, 0))), at_BT, axis=1)
    return pick(lp), (pick(ent) if with_entropy else None)

  def loss(p):
    lp, ent = logp(p, True)
    ref_lp = jax.lax.stop_gradient(logp(ref, False)[0])
    return policy_loss(lp, jnp.asarray(batch.old_logp_BT), ref_lp, ent, adv_B, mask_BT, LCFG.loss)[0], lp

  (loss_value, logp_BT), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return loss_value, np.asarray(logp_BT), grads


def _split(learner, batch):
  (mini,) = learner.split_rollout(batch)
  return mini


def _assert_grads_close(got, want, rtol=1e-5):
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
    g, w = np.asarray(flat_got[path]), np.asarray(w)
    scale = np.abs(w).max()
    assert scale > 0, path
    assert np.abs(g - w).max() <= rtol * scale, (jax.tree_util.keystr(path), np.abs(g - w).max(), scale)


def test_shared_equals_unshared_and_the_whole_conversation(setup, batch):
  learners, params, ref = setup
  assert batch.turn_lengths_BK[:9].astype(bool).sum(1).tolist() == [1] * 3 + [2] * 3 + [3] * 3
  assert len({tuple(g) for g in batch.image_grid_BI3[:9, 0]}) > 1 and len({tuple(g) for g in batch.prefix_grid_GI3[:, 0]}) > 1
  minis = {share: _split(learner, batch) for share, learner in learners.items()}
  # The shared layout really shares: per micro-batch of 4 rows at most 2 prompts (+ padding slot), vs 4.
  assert minis[True].prefix_ids_GS.shape[1] == 2 and minis[False].prefix_ids_GS.shape[1] == 4
  logp = {share: np.asarray(learners[share].old_logprobs(params, minis[share])).reshape(batch.input_ids_BT.shape)
          for share in learners}
  on = batch.loss_mask_BT > 0
  np.testing.assert_allclose(logp[True][on], logp[False][on], rtol=1e-5, atol=1e-6)
  assert np.all(logp[True][~on] == 0) and np.all(logp[False][~on] == 0)
  # Sampler log-probs near the policy's, so that ratios fall on both sides of the clip range.
  rng = np.random.default_rng(0)
  batch = batch.replace(old_logp_BT=np.where(on, logp[True] + rng.uniform(-0.3, 0.3, on.shape), 0).astype(np.float32))
  (g_s, m_s), (g_u, m_u) = (
      learners[share].grads_and_metrics(params, ref, _split(learners[share], batch), batch.rewards_B,
                                        batch.group_ids_B, 0) for share in (True, False))
  assert 0 < m_s["clip_frac"] < 1
  for k, v in m_u.items():
    np.testing.assert_allclose(float(m_s[k]), float(v), rtol=1e-5, atol=1e-7, err_msg=k)
  _assert_grads_close(g_s, g_u)
  # Against the whole conversation per row.
  loss_w, logp_w, g_w = _whole_conversation(learners[True], params, ref, batch)
  np.testing.assert_allclose(logp[True][on], logp_w[on], rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(float(m_s["loss"]), float(loss_w), rtol=1e-5)
  _assert_grads_close(g_s, g_w)
  # Every image's vision tower gets a gradient: the prefix's (original image) and the crops'.
  assert np.abs(np.asarray(g_s["visual"]["qkv"][...])).max() > 0


def _loops_over(jaxpr, shape) -> int:
  """Scans, at any depth of `jaxpr`, that step through an operand of `shape` (e.g. a stacked per-block
  weight [L, ...]) as a scanned input: a tower's loop over its blocks, forward or backward. (Loops that
  merely close over the weights, like the micro-batch loop, don't count.)"""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      xs = eqn.invars[eqn.params["num_consts"] + eqn.params["num_carry"]:]
      count += any(getattr(v.aval, "shape", None) == shape for v in xs)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _loops_over(sub.jaxpr, shape)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          count += _loops_over(sub, shape)
  return count


def test_one_vision_loop_per_forward(setup, batch):
  """The prefixes' images and the rows' crops go through ONE vision-tower loop per forward (and one per
  backward): as many vision loops as decoder loops, in the old-logprobs program and in the update program
  (policy forward and backward, reference forward). Two independent vision loops in one program are two
  streams of collectives (per-block weight gathers) whose interleaving XLA:CPU leaves open: the processes
  of a multi-process CPU run interleaved them differently and gloo failed (tests/test_multihost.py)."""
  learners, params, ref = setup
  learner = learners[True]
  assert LCFG.loss.kl_coef != 0  # the update program holds the reference forward too
  mini = _split(learner, batch)
  assert mini.prefix_vision is not None and mini.vision is not None
  state = learner.init(init_model(CFG, 0))
  programs = {
      "old_logprobs": (jax.make_jaxpr(learner._old_logprobs_fn)(params, mini), 1),
      "update": (jax.make_jaxpr(learner._update_fn)(state, ref, mini, jnp.asarray(batch.rewards_B),
                                                    jnp.asarray(batch.group_ids_B), 0), 3)}
  vision_w, decoder_w = params["visual"]["qkv"][...].shape, params["q"][...].shape
  for name, (closed, passes) in programs.items():
    loops = {"decoder": _loops_over(closed.jaxpr, decoder_w), "vision": _loops_over(closed.jaxpr, vision_w)}
    assert loops == {"decoder": passes, "vision": passes}, (name, loops)


@pytest.mark.parametrize("n,G,B", [(1, 3, 5), (2, 4, 6), (4, 4, 8), (4, 8, 4)])
def test_prefix_rows_is_a_per_block_take(n, G, B):
  """`prefix_rows` gives each row its prefix's entry, like a global take, while indexing only within the
  row's device block (block i: prefixes [i G/n, (i+1) G/n), rows [i B/n, (i+1) B/n)). The global take
  over the sharded prefix axis is what libtpu 0.0.42.1 aborted on at one prefix per device (G == n)."""
  rng = np.random.default_rng(n * 100 + G)
  x_G2 = rng.normal(size=(G, 2)).astype(np.float32)
  block_B = np.arange(B) // (B // n)
  index_B = block_B * (G // n) + rng.integers(G // n, size=B)
  got = prefix_rows(jnp.asarray(x_G2), jnp.asarray(index_B, jnp.int32), n)
  np.testing.assert_array_equal(np.asarray(got), x_G2[index_B])


def test_tokens_off_the_turn_mask_get_exactly_zero_weight(setup, batch):
  """Prompt tokens (the prefix, the continuation's first token and later user turns), padding and padding
  rows: garbage there changes nothing; a token on the mask does."""
  learners, params, ref = setup
  learner = learners[True]
  (mini,) = learner.split_rollout(batch)
  g0, m0 = learner.grads_and_metrics(params, ref, mini, batch.rewards_B, batch.group_ids_B, 0)
  rng = np.random.default_rng(0)
  off = batch.loss_mask_BT == 0
  garbage = np.where(off, rng.choice([np.nan, np.inf, -1e4, 7.0], size=off.shape), batch.old_logp_BT)
  ids = batch.input_ids_BT.copy()
  pad = batch.mask_BT == 0
  ids[pad] = rng.integers(0, 250, pad.sum())                 # continuation padding
  pids = batch.prefix_ids_GS.copy()
  ppad = batch.prefix_mask_GS == 0
  pids[ppad] = rng.integers(0, 250, ppad.sum())              # prefix padding
  perturbed = batch.replace(old_logp_BT=garbage.astype(np.float32), input_ids_BT=ids, prefix_ids_GS=pids)
  (mini1,) = learner.split_rollout(perturbed)
  g1, m1 = learner.grads_and_metrics(params, ref, mini1, batch.rewards_B, batch.group_ids_B, 0)
  for k in ("loss", "pg_loss", "kl", "entropy", "num_tokens"):
    assert float(m1[k]) == float(m0[k]), k
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Positive controls: a token on the mask, and a real prefix token (it conditions the samples).
  b, t = 4, int(np.flatnonzero(batch.loss_mask_BT[4])[1])
  old = batch.old_logp_BT.copy()
  old[b, t] -= 0.3
  (mini2,) = learner.split_rollout(batch.replace(old_logp_BT=old))
  _, m2 = learner.grads_and_metrics(params, ref, mini2, batch.rewards_B, batch.group_ids_B, 0)
  assert float(m2["loss"]) != float(m0["loss"])
  pids = batch.prefix_ids_GS.copy()
  pids[1, 0] = (pids[1, 0] + 1) % 250
  (mini3,) = learner.split_rollout(batch.replace(prefix_ids_GS=pids))
  _, m3 = learner.grads_and_metrics(params, ref, mini3, batch.rewards_B, batch.group_ids_B, 0)
  assert float(m3["kl"]) != float(m0["kl"])


_WORKER = textwrap.dedent("""
    import dataclasses, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from mgpo_jax.parallel import sharding as shd
    from mgpo_jax.models.qwen2_5_vl import init_model
    from mgpo_jax.learner import Learner, LearnerConfig, OldLogpSource
    from mgpo_jax.testing import random_train_batch
    from test_train_step import tiny_config

    out_dir = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_config()
    policy = nnx.split(init_model(cfg, 0), nnx.Param, ...)[1]
    reference = nnx.split(init_model(cfg, 1), nnx.Param, ...)[1]
    # 4 groups of 3 + 4 padding rows, one mini-batch of 2 micro-batches of 8 rows.
    batch = random_train_batch(cfg, num_prompts=4, samples_per_prompt=3, seq_len=48, num_padding_rows=4, seed=7)
    batch = batch.replace(rewards_B=np.asarray([1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0] + [0] * 4, np.float32))
    lcfg = LearnerConfig(micro_batch_size=8, num_mini_batches=1, logprob_chunk_size=16, remat=False,
                         old_logp=OldLogpSource.SAMPLER)
    report = {}
    for name, shape, share in (("1x1x1", (1, 1, 1), True), ("2x2x2", (2, 2, 2), True),
                               ("2x2x2_unshared", (2, 2, 2), False)):
      mesh = shd.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
      learner = Learner(dataclasses.replace(lcfg, share_prefix=share), cfg, mesh)
      params = learner.init(nnx.merge(learner.graphdef, jax.tree.map(jnp.copy, policy))).params
      ref = learner.reference_params(reference)
      (mini,) = learner.split_rollout(batch)
      logp = learner.old_logprobs(params, mini)
      grads, metrics = learner.grads_and_metrics(params, ref, mini, batch.rewards_B, batch.group_ids_B, 0)
      np.savez(f"{out_dir}/{name}.npz", logp=np.asarray(logp),
               **{jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(grads)[0]})
      report[name] = dict(metrics={k: float(v) for k, v in metrics.items()},
                          num_prefixes=int(mini.prefix_ids_GS.shape[1]),
                          prefix_spec=list(mini.prefix_ids_GS.sharding.spec),
                          num_devices=len(mini.prefix_ids_GS.sharding.device_set))
    json.dump(report, open(f"{out_dir}/report.json", "w"))
""")


def test_shared_on_8_devices_matches_one_device(tmp_path):
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
             PYTHONPATH=os.pathsep.join([tests_dir, os.path.dirname(tests_dir), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path)], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.load(open(tmp_path / "report.json"))
  base = np.load(tmp_path / "1x1x1.npz")
  # 8 rows per micro-batch; 1 device: one block of 8 rows -> 4 prompt slots (3 groups + padding rounding);
  # 2x2x2 (data*fsdp = 4): blocks of 2 rows, 1 slot each when shared, 2 unshared.
  assert report["1x1x1"]["num_prefixes"] == 4
  assert report["2x2x2"]["num_prefixes"] == 4 * 2 and report["2x2x2_unshared"]["num_prefixes"] == 4 * 2
  assert report["2x2x2"]["prefix_spec"] == [None, ["data", "fsdp"]] and report["2x2x2"]["num_devices"] == 8
  for name in ("2x2x2", "2x2x2_unshared"):
    got = np.load(tmp_path / f"{name}.npz")
    for k, v in report["1x1x1"]["metrics"].items():
      np.testing.assert_allclose(report[name]["metrics"][k], v, rtol=1e-5, atol=1e-7, err_msg=f"{name} {k}")
    np.testing.assert_allclose(got["logp"], base["logp"], rtol=1e-5, atol=1e-6)
    for k in base.files:
      if k != "logp":
        scale = np.abs(base[k]).max()
        assert np.abs(got[k] - base[k]).max() <= 1e-5 * scale, (name, k)
