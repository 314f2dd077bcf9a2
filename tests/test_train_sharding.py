"""The same rollout update on 8 simulated CPU devices with several meshes == on one device.

XLA_FLAGS must be set before jax is imported, so the runs happen in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2)]

_WORKER = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from mgpo_jax.parallel import sharding as shd
    from mgpo_jax.models.qwen2_5_vl import init_model
    from mgpo_jax.learner import Learner, LearnerConfig, OptimConfig
    from mgpo_jax.testing import random_train_batch
    from test_train_step import tiny_config

    out_dir = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_config()
    # Recompute old log-probs (one program per mini-batch) and then 2 updates of 2 micro-batches each.
    # Adam eps 1e-6 (not 1e-8): Adam's first steps are ~lr*sign(g), which would turn float
    # reduction-order noise in near-zero gradient entries into +-lr differences between meshes.
    lcfg = LearnerConfig(micro_batch_size=8, num_mini_batches=2, logprob_chunk_size=16,
                         optim=OptimConfig(learning_rate=1e-3, eps=1e-6))
    # Initialised once on one device; Learner.init / reference_params reshard onto each mesh.
    policy = nnx.split(init_model(cfg, 0), nnx.Param, ...)[1]
    reference = nnx.split(init_model(cfg, 1), nnx.Param, ...)[1]
    np.savez(f"{out_dir}/init.npz", **{"/".join(map(str, p)): np.asarray(v) for p, v in
                                        jax.tree_util.tree_flatten_with_path(policy)[0]})
    batch = random_train_batch(cfg, num_prompts=8, samples_per_prompt=4, seq_len=64, seed=5)
    report = {}
    for shape in [(1, 1, 1)] + %(meshes)r:
      devices = jax.devices()[:int(np.prod(shape))]
      mesh = shd.make_mesh(shape, devices)
      learner = Learner(lcfg, cfg, mesh)
      state = learner.init(nnx.merge(learner.graphdef, jax.tree.map(jnp.copy, policy)))
      ref = learner.reference_params(reference)
      mini0 = learner.split_rollout(batch)[0]
      state, metrics = learner.train_on_rollout(state, ref, batch)
      name = "x".join(map(str, shape))
      flat = {"/".join(map(str, p)): np.asarray(v) for p, v in
              jax.tree_util.tree_flatten_with_path(state.params)[0]}
      np.savez(f"{out_dir}/{name}.npz", **flat)
      mu = state.opt_state[1][0].mu   # chain(clip, adamw) -> adamw's ScaleByAdamState
      report[name] = dict(
          metrics=[{k: float(v) for k, v in m.items()} for m in metrics],
          spec={k: list(getattr(state.params, k)[...].sharding.spec) for k in ("q", "embed", "lm_head", "down")},
          shard_shape={k: list(getattr(state.params, k)[...].addressable_shards[0].data.shape)
                       for k in ("q", "embed", "lm_head", "down")},
          visual_qkv_spec=list(state.params["visual"]["qkv"][...].sharding.spec),
          mu_q_spec=list(mu["q"][...].sharding.spec),
          ref_q_spec=list(ref["q"][...].sharding.spec),
          batch_ids_spec=list(mini0.input_ids_BT.sharding.spec),
          batch_ids_shard=list(mini0.input_ids_BT.addressable_shards[0].data.shape),
          num_devices=len(state.params["q"][...].sharding.device_set))
    try:
      Learner(LearnerConfig(micro_batch_size=4), cfg, shd.make_mesh((8, 1, 1)))
      report["micro_batch_error"] = None
    except ValueError as e:
      report["micro_batch_error"] = str(e)
    json.dump(report, open(f"{out_dir}/report.json", "w"))
""") % {"meshes": MESHES}


def test_sharded_update_matches_single_device(tmp_path):
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  # LLVM optimisation off: compiles ~3x faster; every mesh (and the 1-device run) uses the same flags.
  flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
             PYTHONPATH=os.pathsep.join([tests_dir, os.path.dirname(tests_dir),
                                         os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", _WORKER, str(tmp_path)], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.load(open(tmp_path / "report.json"))
  base = report["1x1x1"]
  base_params = np.load(tmp_path / "1x1x1.npz")
  init_params = np.load(tmp_path / "init.npz")
  moved = max(np.abs(base_params[k] - init_params[k]).max() for k in base_params.files)
  assert moved > 1e-3, moved   # the updates are large compared with the tolerance below
  assert base["num_devices"] == 1
  for m in base["metrics"]:
    assert m["grad_norm"] > 0 and np.isfinite(list(m.values())).all()
  assert base["metrics"][0]["clip_frac"] == 0.0   # recomputed old log-probs: ratio 1 at the first update

  for shape in MESHES:
    name = "x".join(map(str, shape))
    got = report[name]
    for m_got, m_want in zip(got["metrics"], base["metrics"]):
      for k, v in m_want.items():
        np.testing.assert_allclose(m_got[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
    params = np.load(tmp_path / f"{name}.npz")
    assert set(params.files) == set(base_params.files)
    for k in base_params.files:
      # Two AdamW steps at lr 1e-3 move weights by up to ~2e-3; measured differences <= ~1.6e-6.
      np.testing.assert_allclose(params[k], base_params[k], rtol=0, atol=5e-6, err_msg=f"{name} {k}")
    assert got["num_devices"] == 8
    assert got["batch_ids_shard"][1] == 8 // (shape[0] * shape[1])   # [K, U/dp, T] rows per device

  assert "data-parallel" in report["micro_batch_error"]   # 4 rows cannot shard over 8 devices

  # Parameters really are sharded: FSDP over `embed`, tensor parallel over heads / mlp / vocab.
  r = report["1x4x2"]
  assert r["spec"]["q"] == [None, "fsdp", "tensor", None]
  assert r["spec"]["embed"] == ["tensor", "fsdp"] and r["spec"]["lm_head"] == ["fsdp", "tensor"]
  assert r["shard_shape"]["q"] == [2, 64 // 4, 4 // 2, 16]
  assert r["shard_shape"]["embed"] == [300 // 2, 64 // 4]
  assert r["shard_shape"]["down"] == [2, 96 // 2, 64 // 4]
  assert r["visual_qkv_spec"] == [None, "fsdp", None, "tensor", None]
  assert r["mu_q_spec"] == r["spec"]["q"] and r["ref_q_spec"] == r["spec"]["q"]
  assert r["batch_ids_spec"] == [None, ["data", "fsdp"]]
  assert report["2x4x1"]["shard_shape"]["q"] == [2, 64 // 4, 4, 16]
  assert report["8x1x1"]["shard_shape"]["q"] == [2, 64, 4, 16]   # pure data parallel: replicated
