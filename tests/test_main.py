"""The README's quick start (`python -m mgpo_jax.main`) end to end, a SIGKILL + resume, and no
recompilation after warm-up. Each run is a real subprocess of the command users type, started from a
folder outside the repository (the configs ship with the package)."""

import hashlib
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


def _outside(path):
  """A working folder outside the repository, next to the run."""
  cwd = os.path.join(os.path.dirname(os.fspath(path)), "cwd")
  os.makedirs(cwd, exist_ok=True)
  return cwd


def _run(workdir, timeout=600):
  proc = subprocess.run(_cmd(workdir), cwd=_outside(workdir), env=_env(), capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _maths(row):
  """The values that depend only on the maths (not on timings or on what this process compiled)."""
  return {k: v for k, v in row.items() if not k.startswith(("time/", "compile/"))}


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run_a")
  return workdir, _run(workdir)


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
  return uninterrupted_run[0]


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
  proc = subprocess.Popen(_cmd(workdir), cwd=_outside(workdir), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:  # Orbax renames a step folder into place once it is complete
    _wait_for(proc, (workdir / "checkpoints" / "2").is_dir, "its step-2 checkpoint")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert max(logged()) < STEPS

  proc = subprocess.Popen(_cmd(workdir), cwd=_outside(workdir), env=_env(), stdout=subprocess.DEVNULL,
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
  assert len(proc.stderr.splitlines()) < 10, proc.stderr  # no Orbax / absl INFO per restored item
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


# ------------------------------------------------------------------------------------------------
# What a newcomer sees: the console, a failed restart, the release folder.
# ------------------------------------------------------------------------------------------------


def test_console_shows_the_compile_notice_and_a_closing_summary_and_no_third_party_noise(uninterrupted_run):
  workdir, proc = uninterrupted_run
  out = proc.stdout + proc.stderr
  assert "step 1: compiling the rollout and update programs" in proc.stderr
  # Not a terminal: one log line per step instead of a \r-redrawn bar.
  assert all(f"step {k}/{STEPS}" in proc.stderr for k in range(1, STEPS + 1))
  assert "\r" not in proc.stderr
  summary = proc.stdout[proc.stdout.index("done: step"):]
  assert f"done: step {STEPS}" in summary and "eval accuracy" in summary
  for where in ("metrics.jsonl", "tensorboard --logdir", os.path.join("rollouts", "index.html"),
                "checkpoints", "python -m mgpo_jax.evaluate", "convert_weights.py"):
    assert where in summary, where
  for noise in ("Using custom data configuration", "Downloading and preparing", "downloaded and prepared",
                "PyTorch was not found", "Event loop is closed", "Traceback"):
    assert noise not in out, noise
  assert len(out.splitlines()) < 40, out


def test_programs_quiet_transformers_at_import():
  # The notice "PyTorch was not found" is printed by transformers at import when torch is absent (the
  # tests have torch, so the absence of the line above proves little): check the switch that stops it.
  code = ("import mgpo_jax.main, transformers; from transformers.utils import logging as l; "
          "print(l.get_verbosity() == l.ERROR)")
  proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.stdout.strip() == "True", proc.stderr[-2000:]


def _tree_digest(root):
  h = hashlib.sha256()
  for d, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(d, f)
      h.update(os.path.relpath(p, root).encode())
      h.update(open(p, "rb").read())
  return h.hexdigest()


def test_a_restart_with_another_model_shape_stops_before_writing_anything(uninterrupted, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "copy"
  shutil.copytree(uninterrupted, workdir)
  before = _tree_digest(workdir)
  changed = ["--config=cpu_tiny", "--config.model.tiny.hidden_size=128",
             "--config.model.tiny.vision.out_hidden_size=128", "--config.model.tiny.num_heads=8"]
  proc = subprocess.run(_cmd(workdir, *changed), cwd=_outside(workdir), env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith("mgpo_jax.main: error: cannot resume")
  assert "hidden_size=64 in the checkpoints, 128 in this config" in lines[0]
  assert _tree_digest(workdir) == before
  # The run is intact: the original command still resumes it (nothing left to do) and evaluates it.
  _run(workdir)
  assert _tree_digest(workdir / "checkpoints") == _tree_digest(uninterrupted / "checkpoints")


def test_the_hf_export_is_a_release_folder_transformers_runs_on_an_image(uninterrupted):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  hf_dir = uninterrupted / "hf_export"
  for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "preprocessor_config.json", "model.safetensors.index.json"):
    assert (hf_dir / name).is_file(), name
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(hf_dir).st_mode & 0o777 == 0o777 & ~umask
  assert all(os.stat(hf_dir / f).st_mode & 0o044 == 0o044 & ~umask for f in os.listdir(hf_dir))
  pre = json.load(open(hf_dir / "preprocessor_config.json"))
  assert (pre["min_pixels"], pre["max_pixels"]) == (16 * 28 * 28, 64 * 28 * 28)  # the cpu_tiny run's

  # transformers 5 builds Qwen2.5-VL's AutoProcessor with a video processor that needs torchvision, which
  # cannot be installed beside the CPU torch wheel of this environment: where it is missing, the only
  # acceptable failure is that backend (the folder itself is complete); the image processor and the
  # tokenizer AutoProcessor would combine are then loaded and run one by one.
  try:
    transformers.AutoProcessor.from_pretrained(hf_dir)
  except ImportError as e:
    import importlib.util  # pylint: disable=g-import-not-at-top
    assert importlib.util.find_spec("torchvision") is None and "Torchvision" in str(e), e
  image_processor = transformers.AutoImageProcessor.from_pretrained(hf_dir)
  # The run's pixel bounds (cpu_tiny: 16..64 merged tokens), not Qwen's defaults.
  assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (16 * 28 * 28, 64 * 28 * 28)
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
  vision = image_processor(images=[image], return_tensors="pt")
  merged = int(vision["image_grid_thw"].prod()) // 4
  assert 16 <= merged <= 64
  inputs = tokenizer([text.replace("<|image_pad|>", "<|image_pad|>" * merged)], return_tensors="pt")
  with torch.no_grad():
    out = model.generate(**inputs, **vision, max_new_tokens=4, do_sample=False)
  assert out.shape[1] > inputs["input_ids"].shape[1]
