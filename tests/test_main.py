"""The README's quick start (`python -m mgpo_jax.main`) end to end, a SIGKILL + resume, and no
recompilation after warm-up. Each run is a real subprocess of the command users type."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mgpo_jax.io import events as events_lib
from mgpo_jax.io import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
ARGS = [f"--config.train.num_steps={STEPS}", "--config.train.eval_every=2",
        "--config.train.checkpoint_every=2", "--config.train.visualize_every=4",
        "--config.train.keep_checkpoints=2", "--config.train.export_hf_at_end=True"]


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "mgpo_jax.main", f"--workdir={workdir}", *ARGS, *extra]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  return env


def _run(workdir, timeout=600):
  proc = subprocess.run(_cmd(workdir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _maths(row):
  """The values that depend only on the maths (not on timings or on what this process compiled)."""
  return {k: v for k, v in row.items() if not k.startswith(("time/", "compile/"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run_a")
  _run(workdir)
  return workdir


def test_quick_start_writes_metrics_checkpoints_and_rollout_pages(uninterrupted):
  rows = metrics_lib.read_metrics(uninterrupted)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  for key in ("train/loss", "train/kl", "train/entropy", "train/clip_frac", "train/grad_norm",
              "train/reward_mean", "train/valid_box_ratio", "train/response_length_turn1",
              "train/response_length_turn2", "rollout/reward_mean", "time/rollout_s"):
    assert all(key in r for r in rows), key
  assert all(r["train/grad_norm"] > 0 for r in rows)
  assert "eval/accuracy" in rows[1] and "eval/accuracy" not in rows[0]
  assert {"eval/accuracy/color", "eval/accuracy/shape"} <= set(rows[-1])
  # keep_checkpoints=2: the last two of steps 2, 4, 6, 8.
  ckpt = os.path.join(uninterrupted, "checkpoints")
  assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [6, 8]
  for item in ("params", "opt_state", "data", "meta"):
    assert os.path.isdir(os.path.join(ckpt, "8", item)), item
  assert os.path.isfile(os.path.join(ckpt, "hf_config.json"))
  assert os.path.isfile(os.path.join(ckpt, "hf_assets", "tokenizer.json"))
  export = os.path.join(uninterrupted, "hf_export")
  assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(os.listdir(export))
  pages = os.listdir(os.path.join(uninterrupted, "rollouts"))
  assert {"index.html", "step_000004.html", "step_000008.html"} <= set(pages)
  html = open(os.path.join(uninterrupted, "rollouts", "step_000004.html"), encoding="utf-8").read()
  assert "<img" in html
  tb = os.path.join(uninterrupted, "tensorboard")
  events = [e for f in sorted(os.listdir(tb)) for e in events_lib.read_events(os.path.join(tb, f))]
  assert {e.step for e in events if "train/loss" in e.scalars} == set(range(1, STEPS + 1))
  assert {e.step for e in events if e.images} == {4, 8}  # the rollout pictures


def test_no_recompilation_after_warm_up(uninterrupted):
  rows = metrics_lib.read_metrics(uninterrupted)
  # Step 1 compiles the rollout and the update, step 2 the greedy evaluation (another batch shape).
  assert rows[0]["compile/xla_compilations"] > 0
  assert [r["compile/xla_compilations"] for r in rows[2:]] == [0] * (STEPS - 2)


def _wait_for(proc, ready, what):
  deadline = time.time() + 600
  while not ready():
    assert proc.poll() is None, f"the run ended before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.2)


def test_sigkill_sigterm_and_restarts_give_the_uninterrupted_runs_metrics(uninterrupted, tmp_path):
  """Killed (SIGKILL) after its step-2 checkpoint, restarted, preempted (SIGTERM) later, restarted
  again: the metrics of every step equal those of the run that was never interrupted."""
  workdir = tmp_path / "run_b"
  logged = lambda: [r["step"] for r in metrics_lib.read_metrics(workdir)] if (workdir / "metrics.jsonl").exists() else []
  proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:  # Orbax renames a step folder into place once it is complete
    _wait_for(proc, (workdir / "checkpoints" / "2").is_dir, "its step-2 checkpoint")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert max(logged()) < STEPS

  proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(proc, lambda: max(logged(), default=0) >= 4, "step 4 after the restart")
  proc.send_signal(signal.SIGTERM)  # what a TPU preemption sends
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "preempted" in err, err[-3000:]
  last = max(logged())
  assert last < STEPS
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps[-1] == last  # the step it was in when the signal came is saved, periodic or not

  _run(workdir)
  want = [_maths(r) for r in metrics_lib.read_metrics(uninterrupted)]
  got = [_maths(r) for r in metrics_lib.read_metrics(workdir)]
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))
  assert got == want


def test_invalid_config_fails_before_building_anything(tmp_path):
  proc = subprocess.run(_cmd(tmp_path / "bad", "--config.rl.advantage=grp", "--config.rl.clip_ratio_low=-1"),
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "rl.advantage" in proc.stderr and "rl.clip_ratio_low" in proc.stderr
  assert not (tmp_path / "bad" / "checkpoints").exists()
  proc = subprocess.run(_cmd(tmp_path / "bad", "--config.rl.advantag=grpo"), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "advantag" in proc.stderr


def test_evaluate_and_export_reproduce_the_runs_final_evaluation(uninterrupted, tmp_path):
  """The saved policy, evaluated from the checkpoint and from its HF export, scores what the run logged."""
  logged = metrics_lib.read_metrics(uninterrupted)[-1]
  evaluate = [sys.executable, "-m", "mgpo_jax.evaluate"]
  proc = subprocess.run(evaluate + [f"--checkpoint={uninterrupted}", f"--out_dir={tmp_path}"], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  from_ckpt = json.load(open(tmp_path / f"eval_{STEPS}.json"))
  assert from_ckpt == {k: v for k, v in logged.items() if k.startswith("eval/")}

  hf_dir = tmp_path / "hf"
  proc = subprocess.run([sys.executable, "tools/convert_weights.py", "--direction=jax_to_hf",
                         f"--src={uninterrupted}", f"--dst={hf_dir}", "--no_progress"], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir)
  assert transformers.AutoTokenizer.from_pretrained(hf_dir).convert_tokens_to_ids("<|image_pad|>") is not None
  out = tmp_path / "from_hf"
  proc = subprocess.run(evaluate + [f"--checkpoint={hf_dir}", f"--out_dir={out}"], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert json.load(open(out / "eval_0.json")) == from_ckpt
  # The same rollouts, text for text (a random policy's answers are mostly wrong, its texts not trivial).
  preds = [open(d, encoding="utf-8").read() for d in (tmp_path / f"eval_{STEPS}_predictions.jsonl",
                                                     out / "eval_0_predictions.jsonl")]
  assert preds[0] == preds[1] and len(preds[0].splitlines()) == 4
  assert all(json.loads(l)["texts"][0] for l in preds[0].splitlines())
