"""The laptop-scale comparison end to end, reduced (one seed, a short two-stage warm-up, 2 RL steps per
method): the warm-up lowers its loss, both methods train from the same warm-up export, and the results,
table and plot are written. The full comparison's numbers are in the README (configs/repro_synthetic.py,
~50 minutes on 2 cores)."""

import json
import os

import pytest

from configs import repro_synthetic
from mgpo_jax import repro


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  c = repro_synthetic.get_config()
  c.model.tiny.update(dict(hidden_size=64, intermediate_size=128, num_layers=2, mrope_section=(2, 3, 3)))
  c.repro.seeds = (3,)
  c.repro.sft.perception_steps = 10
  c.repro.sft.steps = 30
  c.repro.sft.batch_size = 8
  c.repro.sft.num_samples = 16
  c.repro.sft.learning_rate = 3e-3
  c.data.synthetic.n = 16
  c.train.num_steps = 2
  c.optim.warmup_steps = 1
  c.train.eval_every = 2
  c.train.checkpoint_every = 2
  c.train.visualize_every = 0
  c.eval.synthetic.n = 8
  c.eval.batch_size = 8
  workdir = str(tmp_path_factory.mktemp("repro"))
  return workdir, repro.run(c, workdir)


def _metrics(workdir, method):
  return repro.read_metrics(os.path.join(workdir, "seed3", method, "metrics.jsonl"))


def test_both_methods_start_from_the_same_warmup(run):
  workdir, summary = run
  for method in ("mgpo", "grpo"):
    rows = _metrics(workdir, method)
    assert [r["step"] for r in rows] == [0, 1, 2]  # eval_at_start logs step 0
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    with open(os.path.join(workdir, "seed3", method, "checkpoints", "hf_config.json"), encoding="utf-8") as f:
      assert json.load(f)["hidden_size"] == 64
  sft_rows = repro.read_metrics(os.path.join(workdir, "seed3", "sft", "metrics.jsonl"))
  assert len(sft_rows) == 40 and sft_rows[-1]["sft/loss"] < 0.5 * sft_rows[0]["sft/loss"]
  assert os.path.isfile(os.path.join(workdir, "seed3", "sft", "hf", "tokenizer.json"))
  assert set(summary["methods"]) == {"mgpo", "grpo"}


def test_rollout_metrics_of_each_method(run):
  workdir, _ = run
  mgpo = _metrics(workdir, "mgpo")
  assert 0.0 <= mgpo[1]["rollout/target_hit_rate"] <= mgpo[1]["rollout/valid_box_rate"] <= 1.0
  assert "eval/target_hit_rate" in mgpo[0]
  grpo = _metrics(workdir, "grpo")
  assert "rollout/valid_box_rate" not in grpo[1] and "rollout/turn2_tokens_mean" not in grpo[1]


def test_results_table_and_plot(run):
  workdir, summary = run
  for name in ("results.json", "results.md", "curves.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
    table = f.read()
  assert "| mgpo |" in table and "| grpo |" in table
  m = summary["methods"]["mgpo"]
  assert m["final_accuracy"]["values"] == [pytest.approx(_metrics(workdir, "mgpo")[-1]["eval/accuracy"])]
  diff = _metrics(workdir, "mgpo")[-1]["eval/accuracy"] - _metrics(workdir, "grpo")[-1]["eval/accuracy"]
  assert summary["mgpo_minus_grpo"]["values"] == [pytest.approx(diff)] and "MGPO − GRPO" in table
  # The summary is a pure function of the runs' metrics.jsonl files.
  again = repro.summarize(workdir, (3,), ("mgpo", "grpo"))
  assert again["methods"]["mgpo"]["final_accuracy"] == m["final_accuracy"]
