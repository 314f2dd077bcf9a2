"""The laptop-scale comparison end to end, reduced: a base from the reduced pretraining recipe, then one
seed of the three arms (MGPO, GRPO, the random-crop control) for 2 RL steps each. The base's gates, the
arms' rollout switches, and the results table and plot are checked. The full comparison's numbers are in
the README (configs/repro_scenes.py)."""

import json
import os

import pytest

from mgpo_jax.configs import repro_scenes
from mgpo_jax.repro import __main__ as repro
from mgpo_jax.repro import pretrain
from test_pretrain import CFG, SCENE


def _reduced_config(base_dir):
  c = repro_scenes.get_config()
  c.repro.base_dir = base_dir
  c.repro.seeds = (3,)
  c.repro.gates_num = 4
  for section, n in ((c.data, 16), (c.eval, 4)):
    section.scenes.update(dict(n=n, input_side=SCENE.input_side, num_objects=SCENE.num_objects,
                               object_side=SCENE.object_side, dot_side=SCENE.dot_side, jitter=SCENE.jitter,
                               ring=SCENE.ring))
  c.image.min_pixels, c.image.max_pixels = CFG.image().min_pixels, CFG.image().max_pixels
  c.data.batch_size = 2
  c.rollout.num_generations = 2
  c.rollout.prompt_buckets = (192, 256)
  c.rollout.seq_buckets = (384, 640)  # a 64-token turn 1 (the named box) and a crop can pass 512
  c.rollout.patch_buckets = (72, 144)
  c.rl.mini_batch_size = 2
  c.rl.micro_batch_size = 2
  c.train.num_steps = 2
  c.optim.warmup_steps = 1
  c.train.eval_every = 2
  c.train.checkpoint_every = 2
  c.train.visualize_every = 0
  c.eval.batch_size = 4
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  base = str(tmp_path_factory.mktemp("base"))
  pretrain.run(CFG, base)
  workdir = str(tmp_path_factory.mktemp("repro"))
  return workdir, repro.run(_reduced_config(os.path.join(base, "hf")), workdir)


def _metrics(workdir, method):
  return repro.read_metrics(os.path.join(workdir, "seed3", method, "metrics.jsonl"))


def test_every_arm_starts_from_the_base_with_its_own_rollout(run):
  workdir, summary = run
  assert set(summary["methods"]) == {"mgpo", "grpo", "control"}
  starts = {m: _metrics(workdir, m)[0] for m in ("mgpo", "grpo", "control")}
  for m, row in starts.items():
    assert row["step"] == 0 and "eval/accuracy" in row, m  # eval_at_start: the base itself
  # MGPO and the control sample the same base with the same keys: the same step-0 boxes (greedy eval
  # boxes are the model's own under the control too), so the same valid-box and target-hit rates.
  assert starts["mgpo"]["eval/valid_box_rate"] == starts["control"]["eval/valid_box_rate"]
  assert starts["mgpo"].get("eval/target_hit_rate") == starts["control"].get("eval/target_hit_rate")
  assert "eval/valid_box_rate" not in starts["grpo"] or starts["grpo"]["eval/valid_box_rate"] == 0.0
  for m in ("mgpo", "control"):
    assert any("rollout/target_hit_rate" in r for r in _metrics(workdir, m))


def test_base_gates_are_measured_once_and_reported(run):
  workdir, summary = run
  with open(os.path.join(workdir, "base_gates.json")) as f:
    gates = json.load(f)
  assert gates == summary["base_gates"] and gates["num_scenes"] == 4
  md = repro.results_markdown(summary)
  assert "referring box IoU >= 0.5" in md and "MGPO − the random-crop control" in md and "MGPO − GRPO" in md


def test_results_table_and_plot(run):
  workdir, summary = run
  for name in ("results.json", "results.md", "curves.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["methods"]["mgpo"]["per_seed"][0]["final_step"] == 2
  assert len(saved["mgpo_minus_control"]["values"]) == 1 and len(saved["mgpo_minus_grpo"]["values"]) == 1


def test_a_preempted_arm_stops_the_comparison(tmp_path, monkeypatch):
  """SIGTERM during an arm: its checkpoint is saved and train raises Preempted; the comparison must stop
  there (the same command resumes it), not start the next arm."""
  from mgpo_jax.programs import train as train_program  # pylint: disable=g-import-not-at-top
  started = []

  def fake_train(config, run_dir):
    started.append(run_dir)
    raise train_program.Preempted(step=1)

  monkeypatch.setattr(repro.train_program, "train", fake_train)
  monkeypatch.setattr(repro, "base_gates", lambda config, workdir: {})
  c = repro_scenes.get_config()
  with pytest.raises(train_program.Preempted) as e:
    repro.run(c, str(tmp_path))
  assert e.value.code == 0 and len(started) == 1 and started[0].endswith(os.path.join("seed0", "mgpo"))
