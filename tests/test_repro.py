"""The laptop-scale comparison end to end, reduced (one seed, a short two-stage warm-up, 2 RL steps per
method): the warm-up lowers its loss, both methods train from the same warm-up export, and the results,
table and plot are written. The full comparison's numbers are in the README (configs/repro_synthetic.py,
~50 minutes on 2 cores)."""

import json
import math
import os

import pytest

from configs import repro_synthetic
from mgpo_jax.repro import __main__ as repro
from mgpo_jax.repro import probe as repro_probe


def _reduced_config():
  c = repro_synthetic.get_config()
  c.model.tiny.update(dict(hidden_size=64, intermediate_size=128, num_layers=2, mrope_section=(2, 3, 3)))
  c.model.tiny.vision.out_hidden_size = 64  # the vision tower feeds the decoder
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
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("repro"))
  return workdir, repro.run(_reduced_config(), workdir)


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


# ------------------------------------------------------------------------------------------------
# The localisation probe (a diagnostic beside the comparison: labelled boxes, never used by it).
# ------------------------------------------------------------------------------------------------


def test_probe_rows_carry_the_label_cell_and_mask_the_answer(run):
  from mgpo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mgpo_jax.programs import experiment  # pylint: disable=g-import-not-at-top
  from mgpo_jax.models.qwen2_5_vl import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from mgpo_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from mgpo_jax.rollout import crop as crop_lib  # pylint: disable=g-import-not-at-top
  from mgpo_jax.repro import warmup  # pylint: disable=g-import-not-at-top

  workdir, _ = run
  c = _reduced_config()
  tok = tok_lib.load_tokenizer(os.path.join(workdir, "seed3", "sft", "hf"))
  rcfg = config_lib.rollout_config(c)
  samples = warmup.decoded(synthetic.iter_split(6, 5, config_lib.synthetic_config(c.data)), c.data.max_image_pixels)
  rows = repro_probe.labelled_rows(samples, tok, experiment.build_model_config(c, tok), rcfg, 3, train_answer=False)
  for sample, tr in zip(samples, rows):
    in_size = warmup.input_size(sample["image"].size, rcfg.image)
    cover = [crop_lib.target_coverage(b, in_size, sample["image"].size, sample["target_box"])
             for b in warmup.grid_boxes(*in_size, 3)]
    assert tr.box_valid == [True]
    assert crop_lib.target_coverage(tr.boxes[0], in_size, sample["image"].size, sample["target_box"]) == max(cover)
    (s1, e1), (s2, e2) = tr.turn_spans
    assert tr.turn_mask[s1:e1].all() and not tr.turn_mask[s2:e2].any()


def test_labelled_cells_answers_one_label_per_row():
  cells = repro_probe.LabelledCells([2, 0])
  assert (cells.integers(9), cells.integers(9)) == (2, 0)
  with pytest.raises(RuntimeError, match="one cell index per format row"):
    cells.integers(9)
  with pytest.raises(RuntimeError, match="outside"):
    repro_probe.LabelledCells([9]).integers(9)


def test_probe_reports_the_held_out_box_nll(run, tmp_path):
  workdir, _ = run
  c = _reduced_config()
  c.repro.sft.batch_size = 4
  out = str(tmp_path / "probe.json")
  r = repro_probe.run(c, os.path.join(workdir, "seed3", "sft", "hf"), steps=2, eval_every=1, learning_rate=1e-3,
                      num_samples=8, num_eval=4, out_path=out)
  steps = [s for s, _ in r["held_out_box_nll"]]
  assert steps == [0, 1, 2]
  # (the reduced 40-step warm-up is far from the full one's ~2.2 nats, so only finiteness is checked)
  assert all(math.isfinite(nll) and nll > 0.0 for _, nll in r["held_out_box_nll"])
  assert r["held_out_box_nll"][2][1] != r["held_out_box_nll"][0][1]  # the updates moved the model
  with open(out, encoding="utf-8") as f:
    assert json.load(f)["image_blind_nll"] == pytest.approx(2.1972, abs=1e-3)
