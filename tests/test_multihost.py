"""The multi-host code path for real: 2 CPU processes (jax.distributed, gloo collectives on localhost)
train 2 steps of the tiny config and match a single process with the same 2 devices.

What must agree: each process feeds its strided half of every global batch, samples its own prompts
(per-row keys make a row's samples independent of the rest of the batch), rewards/advantages are
gathered over both, the update is one SPMD program over both processes' devices, evaluation counts
are summed, checkpoints are written by both and logs by process 0 only.
"""

import os
import socket
import subprocess
import sys

import numpy as np

from mgpo_jax.io import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config.train.num_steps=2", "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
        "--config.train.visualize_every=0", "--config.data.batch_size=2", "--config.rl.mini_batch_size=2",
        "--config.rl.micro_batch_size=1", "--config.mesh.sampling_shape=(-1,1,1)", "--config.eval.num_samples=4",
        "--config.eval.batch_size=2"]


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _maths(row):
  return {k: v for k, v in row.items() if not k.startswith(("time/", "compile/"))}


def test_two_processes_match_one(tmp_path):
  single = tmp_path / "single"
  proc = subprocess.run([sys.executable, "-m", "mgpo_jax.main", f"--workdir={single}", *ARGS], cwd=REPO,
                        env=_env(2), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]

  multi = tmp_path / "multi"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "mgpo_jax.main", f"--workdir={multi}", *ARGS,
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=600)[0])
    finally:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)

  want = [_maths(r) for r in metrics_lib.read_metrics(single)]
  got = [_maths(r) for r in metrics_lib.read_metrics(multi)]
  assert [r["step"] for r in got] == [1, 2] and set(got[1]) == set(want[1])
  assert got[1]["eval/num_samples"] == 4.0  # both processes' halves counted
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_allclose(g[k], w[k], rtol=1e-4, atol=1e-6, err_msg=f"step {w['step']}: {k}")
  # Both processes wrote their data-iterator state; only process 0 wrote the logs.
  data = os.listdir(multi / "checkpoints" / "2" / "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data)
  assert len(os.listdir(multi / "tensorboard")) == 1
