"""`python -m mgpo_jax.evaluate --benchmarks=...` end to end on copies of the released layouts, with a
tiny random Qwen2.5-VL (a plain HF directory): readers, rollouts, graders, scores, the table and the
per-question predictions, for the protocols mgpo, direct and mgpo with 3 turns."""

import json
import os
import subprocess
import sys

import pytest

import benchmark_fixtures as F
import hf_reference as R
import numpy as np
from PIL import Image

from mgpo_jax.eval import grading, suite
from mgpo_jax.eval import table as table_lib
from mgpo_jax.rollout.trajectory import Trajectory
from mgpo_jax.models.qwen2_5_vl.chat import special_token_ids
from mgpo_jax.models.qwen2_5_vl.tokenizer import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("vstar", "hrbench_4k", "hrbench_8k", "mme_realworld_lite", "mgpo_val")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("benchmarks")
  F.write_vstar(root / "vstar_bench")
  with open(root / "vstar_bench" / "test_questions.jsonl", "a") as f:  # its image is missing: skipped at decode
    f.write(json.dumps({"image": "direct_attributes/sa_404.jpg", "text": "Q?\n(A) a\n(B) b\nAnswer.",
                        "category": "direct_attributes", "question_id": 3, "label": "B"}) + "\n")
  rows = F.hrbench_rows()
  F.write_hrbench_parquet(root / "hr_bench_4k.parquet", rows)
  rows[5]["image"] = "%%%"  # undecodable base64: skipped by the reader
  F.write_hrbench_tsv(root / "hr_bench_8k.tsv", rows)
  F.write_mme_parquet(root / "mme_lite")
  (root / "imgs").mkdir()
  F.write_mgpo_parquet(root / "val.parquet", root / "imgs")
  paths = {"vstar": root / "vstar_bench", "hrbench_4k": root / "hr_bench_4k.parquet",
           "hrbench_8k": root / "hr_bench_8k.tsv", "mme_realworld_lite": root / "mme_lite",
           "mgpo_val": root / "val.parquet"}
  return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  tok = build_tokenizer(d)
  sp = special_token_ids(tok)
  R.build_reference(d, seed=5, vocab=len(tok), image_token_id=sp.image_pad, video_token_id=sp.video_pad,
                    vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end,
                    eos_token_id=sp.im_end, bos_token_id=sp.endoftext, pad_token_id=sp.pad)
  return d


def _evaluate(hf_dir, data, out, names, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "mgpo_jax.evaluate", "--config=configs/cpu_tiny.py", f"--checkpoint={hf_dir}",
         f"--out_dir={out}", f"--benchmarks={','.join(names)}",
         "--benchmark_paths=" + ",".join(f"{k}={v}" for k, v in data.items()),
         "--config.eval.num_samples=0", "--config.eval.batch_size=8", "--config.rollout.max_new_tokens=8",
         "--config.rollout.patch_buckets=(256,512,768)", *flags]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


# Questions per benchmark in the fixtures, and those skipped (V*: a missing image; HR-Bench 8K: bad base64).
SCORED = {"vstar": 3, "hrbench_4k": 8, "hrbench_8k": 7, "mme_realworld_lite": 3, "mgpo_val": 3}
SKIPPED = {"vstar": 1, "hrbench_4k": 0, "hrbench_8k": 1, "mme_realworld_lite": 0, "mgpo_val": 0}
COLUMNS = {
    "vstar": ["vstar", "vstar/direct_attributes", "vstar/relative_position"],
    "hrbench_4k": ["hrbench_4k", "hrbench_4k/single", "hrbench_4k/cross"],
    "hrbench_8k": ["hrbench_8k", "hrbench_8k/single", "hrbench_8k/cross"],
    "mme_realworld_lite": ["mme_realworld_lite", "mme_realworld_lite/Perception/Remote Sensing",
                           "mme_realworld_lite/Perception/Monitoring", "mme_realworld_lite/Reasoning/Diagram and Table"],
    "mgpo_val": ["mgpo_val", "mgpo_val/v_star", "mgpo_val/Perception/Monitoring",
                 "mgpo_val/Reasoning/Diagram and Table"],
}


# All benchmarks with the paper's protocol; direct and 3 turns on a few (each run compiles its own turns).
@pytest.mark.parametrize("flags, names, tag, turns", [
    ((), NAMES, "mgpo", 2),
    (("--protocol=direct",), ("hrbench_8k", "vstar"), "direct", 1),
    (("--max_turns=3", "--config.rollout.seq_buckets=(1024,2048)"), ("vstar",), "mgpo_3turns", 3),
])
def test_evaluate_benchmarks(hf_dir, data, tmp_path, flags, names, tag, turns):
  proc = _evaluate(hf_dir, data, tmp_path, names, *flags)
  result = json.load(open(tmp_path / f"benchmarks_0_{tag}.json"))
  columns = [c for n in NAMES if n in names for c in COLUMNS[n]]  # the paper's order, whatever the flag's
  assert result["columns"] == columns and list(result["row"]) == columns
  assert result["max_turns"] == turns and result["protocol"] == ("direct" if turns == 1 else "mgpo")
  md = open(tmp_path / f"benchmarks_0_{tag}.md").read()
  assert md.splitlines()[0] == "| " + " | ".join(["model", "protocol", *columns]) + " |"
  assert md.splitlines()[2].startswith(f"| {hf_dir} | {tag} | ")
  assert md in proc.stdout + "\n"
  grader = "direct" if turns == 1 else "mgpo"
  for name in names:
    b = result["benchmarks"][name]
    assert (b["num_scored"], b["num_skipped"]) == (SCORED[name], SKIPPED[name]), name
    preds = [json.loads(l) for l in open(tmp_path / f"predictions_0_{tag}_{name}.jsonl")]
    assert len(preds) == SCORED[name] and len({p["id"] for p in preds}) == SCORED[name]
    for p in preds:
      assert len(p["texts"]) == turns and len(p["boxes"]) == len(p["crops"]) == turns - 1
      assert p["correct"] == grading.grade(p["texts"][-1], {"answer": p["answer"], "choices": ["x"] * 5}, grader)[1]
      assert [c is not None for c in p["crops"]] == p["box_valid"]
    if name.startswith("hrbench"):
      assert b["scores"] == table_lib.hrbench_score(preds)
    else:
      assert result["row"][name] == pytest.approx(100.0 * sum(p["correct"] for p in preds) / len(preds))
    if name == "vstar":  # the target-in-box rate, with a grounding turn only
      hits = [p["target_in_box"] for p in preds]
      if turns > 1:
        assert list(b["target_in_box"]) == ["overall", "direct_attributes", "relative_position"]
        assert b["target_in_box"]["overall"] == pytest.approx(100.0 * sum(hits) / len(hits))
      else:
        assert b["target_in_box"] == {} and hits == [None] * 3
      assert "image file not found" in b["skipped"][0]["reason"]
    if name == "hrbench_8k":
      assert b["skipped"][0]["reason"].startswith("undecodable base64 image")


def test_prediction_record_maps_boxes_and_finds_the_target():
  """What a predictions line says of a rollout: the crops in original pixels, the target-in-box test
  (the whole target inside the turn-1 crop), the grade."""
  original = Image.new("RGB", (400, 300))
  grid = np.asarray([1, 10, 20])  # the model saw 280 x 140 (patches of 14)
  sample = {"id": "s", "category": "c", "answer": "B", "choices": ["red", "blue"], "target_box": [100, 60, 140, 90]}

  def traj(boxes, valid, final):
    return Trajectory(token_ids=np.zeros(1, np.int32), turn_mask=np.zeros(1, np.int32), logprobs=np.zeros(1),
                      turn_spans=[(0, 1)] * (len(boxes) + 1), images=[original], pixel_values=[],
                      image_grids=[grid], texts=["t"] * len(boxes) + [final], boxes=boxes, box_valid=valid)

  p = suite._prediction(traj([(56, 14, 112, 56), (0, 0, 280, 140)], [True, True], "\\boxed{B}"), sample, "mgpo", 14)
  assert p["input_size"] == [280, 140] and p["image_size"] == [400, 300]
  assert p["crops"] == [[80, 30, 160, 120], [0, 0, 400, 300]]
  assert p["target_in_box"] is True and p["correct"] is True and p["prediction"] == "B"
  p = suite._prediction(traj([(56, 14, 84, 56)], [True], "\\boxed{A}"), sample, "mgpo", 14)  # cuts the target
  assert p["crops"] == [[80, 30, 120, 120]] and p["target_in_box"] is False and p["correct"] is False
  p = suite._prediction(traj([None], [False], "B"), sample, "mgpo", 14)
  assert p["crops"] == [None] and p["target_in_box"] is False and p["prediction"] is None
  p = suite._prediction(traj([], [], "B"), sample, "direct", 14)
  assert p["target_in_box"] is None and p["correct"] is True
