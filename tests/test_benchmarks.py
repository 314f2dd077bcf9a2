"""The benchmark readers on copies of the released layouts, the graders on tricky answers, the
benchmarks' own scores and the results table."""

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import benchmark_fixtures as F
from mgpo_jax.data import benchmarks as B
from mgpo_jax.data import pipeline, readers, schema
from mgpo_jax.eval import grading, suite
from mgpo_jax.eval import table as T
from mgpo_jax.rollout import reward


def _ids(samples):
  return [s[schema.ID] for s in samples]


# ------------------------------------------------------------------------------------------------ V*


def test_vstar_per_image_json_release(tmp_path):
  """No answer field: options[0] is correct; the options are shuffled per sample, the same each run."""
  F.write_vstar(tmp_path, with_jsonl=False)
  got = list(readers.read_source("vstar", root=str(tmp_path)))
  assert _ids(got) == ["vstar/direct_attributes/sa_17", "vstar/direct_attributes/sa_4690",
                       "vstar/relative_position/sa_88"]  # OCR/ is not part of the benchmark
  anns = {stem: ann for _, stem, _, ann in F.VSTAR}
  letters = []
  for s in got:
    ann = anns[s[schema.ID].rsplit("/", 1)[1]]
    assert sorted(s[schema.CHOICES]) == sorted(ann["options"])
    assert s[schema.CHOICES]["ABCD".index(s[schema.ANSWER])] == ann["options"][0]
    letters.append(s[schema.ANSWER])
    assert os.path.isfile(s[schema.IMAGE_PATH]) and s[schema.IMAGE_PATH].endswith(".jpg")
  assert set(letters) != {"A"}  # shuffled: the answer is not always the first option
  assert list(B.read_vstar(tmp_path)) == got  # deterministic
  assert list(B.read_vstar(tmp_path, shuffle_seed=1)) != got
  # bbox [[x, y, w, h], ...] -> the union as [x1, y1, x2, y2]
  assert got[1][schema.TARGET_BOX] == [200, 40, 230, 64]
  assert got[2][schema.TARGET_BOX] == [20, 30, 210, 210]


def test_vstar_test_questions_jsonl_release(tmp_path):
  F.write_vstar(tmp_path)
  got = list(B.read_vstar(tmp_path))
  assert _ids(got) == ["vstar/direct_attributes/sa_4690", "vstar/direct_attributes/sa_17",
                       "vstar/relative_position/sa_88"]  # the file's order
  a, b, c = got
  assert a[schema.QUESTION] == "What is the material of the glove?"
  assert a[schema.CHOICES] == ["kevlar", "rubber", "leather", "cotton"] and a[schema.ANSWER] == "B"
  assert b[schema.ANSWER] == "A" and c[schema.CHOICES] == ["right", "left"] and c[schema.ANSWER] == "B"
  assert a[schema.CATEGORY] == "direct_attributes" and c[schema.CATEGORY] == "relative_position"
  assert a[schema.TARGET_BOX] == [200, 40, 230, 64]  # joined from the per-image JSON
  assert a[schema.IMAGE_PATH] == str(tmp_path / "direct_attributes" / "sa_4690.jpg")
  assert list(B.read_vstar(tmp_path / "test_questions.jsonl")) == got


def test_vstar_lmms_lab_parquet(tmp_path):
  """lmms-lab/vstar-bench: the lettered text and label, the image as an HF image struct."""
  F.write_vstar(tmp_path / "v")
  rows = [json.loads(l) for l in open(tmp_path / "v" / "test_questions.jsonl")]
  table = pa.Table.from_pylist(
      [{"image": {"bytes": F.image(64, 48, i), "path": r["image"]}, "text": r["text"], "label": r["label"],
        "question_id": r["question_id"], "category": r["category"]} for i, r in enumerate(rows)],
      schema=pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string()),
                        ("label", pa.string()), ("question_id", pa.int64()), ("category", pa.string())]))
  pq.write_table(table, tmp_path / "test-00000-of-00001.parquet")
  got = list(B.read_vstar(tmp_path / "test-00000-of-00001.parquet"))
  want = list(B.read_vstar(tmp_path / "v"))
  assert _ids(got) == ["vstar/direct_attributes/0", "vstar/direct_attributes/1", "vstar/relative_position/2"]
  for g, w in zip(got, want):
    assert (g[schema.CHOICES], g[schema.ANSWER], g[schema.QUESTION]) == (w[schema.CHOICES], w[schema.ANSWER],
                                                                          w[schema.QUESTION])
  assert got[0][schema.IMAGE] == F.image(64, 48, 0)


def test_vstar_bad_rows_are_skipped_and_counted(tmp_path):
  F.write_vstar(tmp_path)
  with open(tmp_path / "test_questions.jsonl", "a") as f:
    f.write(json.dumps({"image": "direct_attributes/x.jpg", "text": "Q?\n(A) a\n(B) b\nAnswer.",
                        "category": "direct_attributes", "question_id": 3, "label": "E"}) + "\n")
    f.write(json.dumps({"image": "direct_attributes/y.jpg", "text": "no options here", "category": "c",
                        "question_id": 4, "label": "A"}) + "\n")
    f.write("{oops\n")
  bad = B.BadRows()
  got = list(B.read_vstar(tmp_path, bad_rows=bad))
  assert len(got) == 3 and len(bad) == 3
  assert "answer 'E'" in bad.rows[0]["reason"] and bad.rows[0]["where"].endswith("test_questions.jsonl:4")
  assert "option lines" in bad.rows[1]["reason"] and "not valid JSON" in bad.rows[2]["reason"]
  with pytest.raises(ValueError, match="not a folder"):
    list(B.read_vstar(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------------ HR-Bench


@pytest.mark.parametrize("ext", ["tsv", "parquet"])
def test_hrbench_release(tmp_path, ext):
  rows = F.hrbench_rows()
  path = tmp_path / f"hr_bench_4k.{ext}"
  (F.write_hrbench_tsv if ext == "tsv" else F.write_hrbench_parquet)(path, rows)
  reader = readers.read_source("hrbench", path=str(path))
  first = next(reader)  # lazy: a generator, one row at a time
  got = [first, *reader]
  assert _ids(got) == [f"hr_bench_4k/{i}" for i in range(8)]
  assert first[schema.QUESTION] == rows[0]["question"] and first[schema.CHOICES] == ["OPEN", "CLOSED", "EXIT", "SALE"]
  assert [s[schema.ANSWER] for s in got[:4]] == ["A", "D", "C", "B"]
  assert [s[schema.CATEGORY] for s in got[3:5]] == ["single/cycle4", "cross/cycle1"]
  assert got[0][schema.IMAGE] == F.image(256, 192, 100)  # base64-decoded, still encoded JPEG
  decoded = pipeline.DecodeImage()(got[0])
  assert decoded[schema.IMAGE].size == (256, 192)


def test_hrbench_bad_base64_and_letter_are_counted(tmp_path):
  rows = F.hrbench_rows()
  rows[1]["image"] = "not//base64!"
  rows[2]["answer"] = "F"
  rows[3]["image"] = F.b64(b"GIF89a truncated")  # valid base64, not an image: the pipeline's guard
  path = tmp_path / "hr_bench_8k.tsv"
  F.write_hrbench_tsv(path, rows)
  bad = B.BadRows()
  got = list(B.read_hrbench(path, bad_rows=bad))
  assert len(got) == 6 and [r["reason"][:20] for r in bad.rows] == ["undecodable base64 i", "answer 'F' is neithe"]
  assert isinstance(pipeline.DecodeImage().decode(got[1]), str)
  wrapped = F.b64(F.image(32, 16, 7))
  assert B.image_bytes("\n".join(wrapped[i:i + 76] for i in range(0, len(wrapped), 76))) == F.image(32, 16, 7)


# ------------------------------------------------------------------------------------------------ MME-RealWorld


def test_mme_realworld_json_and_lmms_eval_parquet(tmp_path):
  path = F.write_mme_json(tmp_path / "json")
  js = list(readers.read_source("mme_realworld", path=path))
  assert _ids(js) == [f"mme_realworld/{r['Question_id']}" for r in F.MME_RECORDS]
  assert [s[schema.CATEGORY] for s in js] == ["Perception/Monitoring", "Reasoning/Diagram and Table",
                                              "Perception/Remote Sensing"]
  assert js[0][schema.CHOICES][4] == "The image does not feature the buses" and js[0][schema.ANSWER] == "E"
  assert all(os.path.isfile(s[schema.IMAGE_PATH]) for s in js)

  folder = F.write_mme_parquet(tmp_path / "lmms")
  pa_ = list(readers.read_source("mme_realworld", path=str(folder)))
  assert _ids(pa_) == ["mme_realworld/0", "mme_realworld/1", "mme_realworld/2"]
  for a, b in zip(js, pa_):
    for k in (schema.QUESTION, schema.CHOICES, schema.ANSWER, schema.CATEGORY):
      assert a[k] == b[k]
  assert pipeline.DecodeImage()(pa_[0])[schema.IMAGE].size == (240, 180)


# ------------------------------------------------------------------------------------------------ MGPO parquet


def test_mgpo_parquet(tmp_path):
  path = tmp_path / "train.parquet"
  (tmp_path / "imgs").mkdir()
  F.write_mgpo_parquet(path, tmp_path / "imgs")
  got = list(readers.read_source("mgpo_parquet", path=str(path), path_prefix=""))
  assert _ids(got) == ["mgpo/Perception/Monitoring/0", "mgpo/v_star/1", "mgpo/Reasoning/Diagram and Table/2"]
  assert [s[schema.ANSWER] for s in got] == ["E", "B", "C"]
  assert got[1][schema.CHOICES] == ["kevlar", "rubber", "leather", "cotton"]
  assert got[0][schema.CATEGORY] == "Perception/Monitoring" and schema.IMAGE in got[0]
  remapped = list(B.read_mgpo_parquet(path, path_prefix=f"{F.AUTHORS_PREFIX}={tmp_path / 'imgs'}"))
  assert remapped[2][schema.IMAGE_PATH] == str(tmp_path / "imgs" / "img_2.jpg")
  assert pipeline.DecodeImage()(remapped[2])[schema.IMAGE].size == (224, 160)


@pytest.mark.parametrize("text, want", [
    ("(A) 13\n(B) 90\n(C) 77", ["13", "90", "77"]),
    ("(A) 13 (B) 90 (C) seventy (7) seven", ["13", "90", "seventy (7) seven"]),
    ("A. red\nB. blue", ["red", "blue"]),
    ('["(A) red", "(B) blue"]', ["red", "blue"]),
    ("['red', 'blue']", ["red", "blue"]),
])
def test_parse_choices(text, want):
  assert B.parse_choices(text) == want


# ------------------------------------------------------------------------------------------------ grading

SAMPLE = {"answer": "B", "choices": ["red", "blue", "green", "white"]}


@pytest.mark.parametrize("text, mgpo, direct", [
    ("\\boxed{B}", "B", "B"),
    ("It is blue. \\boxed{(B)}", "B", "B"),
    ("\\boxed{b}", "B", "B"),
    ("\\boxed{B. blue}", "B", "B"),
    ("\\boxed{blue}", "B", "B"),
    ("\\boxed{A} no wait \\boxed{B}", "B", "B"),  # several boxes: the last counts
    ("\\boxed{B} no wait \\boxed{C}", "C", "C"),
    ("(B)", None, "B"),  # no box: wrong for MGPO, read by lmms-eval's parser for direct
    ("b", None, "B"),
    ("B. red", None, "B"),
    ("The answer is B.", None, "B"),
    ("I think the cup is (B) blue", None, "B"),
    ("it is blue", None, None),
    ("", None, None),
])
def test_graders_on_tricky_answers(text, mgpo, direct):
  pred, ok = grading.grade(text, SAMPLE, "mgpo")
  assert pred == mgpo and ok == (mgpo == "B")
  assert float(ok) == reward.exact_match(text, SAMPLE)  # the same as the trainer's reward
  pred, ok = grading.grade(text, SAMPLE, "direct")
  assert pred == direct and ok == (direct == "B")


def test_extract_letter_ignores_letters_beyond_the_options():
  assert grading.extract_letter("E", 4) is None
  assert grading.extract_letter("(E) none", 5) == "E"
  assert grading.extract_letter("A man holds (C).", 4) == "A"  # lmms-eval's leading-letter rule


# ------------------------------------------------------------------------------------------------ scores


def test_hrbench_score_averages_per_cycle():
  # cycle1: single 1/1, cross 0/1 -> all 50; cycle2: single 1/1, cross 1/3 -> all 50 (2/4).
  preds = [{"category": "single/cycle1", "correct": True}, {"category": "cross/cycle1", "correct": False},
           {"category": "single/cycle2", "correct": True}, {"category": "cross/cycle2", "correct": True},
           {"category": "cross/cycle2", "correct": False}, {"category": "cross/cycle2", "correct": False}]
  got = T.hrbench_score(preds)
  assert list(got) == ["overall", "single", "cross"]
  assert got["overall"] == pytest.approx(50.0) and got["single"] == pytest.approx(100.0)
  assert got["cross"] == pytest.approx((0 + 100 / 3) / 2)
  assert T.micro_score(preds)["overall"] == pytest.approx(50.0)  # (3/6): differs per group in general


def test_table_columns_follow_the_papers_order():
  scores = {"mme_realworld_lite": {"overall": 40.0, "Reasoning/Monitoring": 30.0, "Perception/Monitoring": 50.0},
            "vstar": {"overall": 60.0, "direct_attributes": 55.0, "relative_position": 70.0},
            "hrbench_4k": {"overall": 50.0, "single": 60.0, "cross": 40.0}}
  scores["mme_realworld_lite"] = T.micro_score(
      [{"category": "Reasoning/Monitoring", "correct": True}, {"category": "Perception/Monitoring", "correct": False},
       {"category": "Zzz/new", "correct": True}], suite.BENCHMARKS["mme_realworld_lite"].categories)
  row = T.columns(scores, suite.COLUMN_ORDER)
  assert list(row) == ["vstar", "vstar/direct_attributes", "vstar/relative_position", "hrbench_4k",
                       "hrbench_4k/single", "hrbench_4k/cross", "mme_realworld_lite",
                       "mme_realworld_lite/Perception/Monitoring", "mme_realworld_lite/Reasoning/Monitoring",
                       "mme_realworld_lite/Zzz/new"]
  md = T.markdown([row], list(row)).splitlines()
  assert md[0].startswith("| vstar | vstar/direct_attributes") and md[2].startswith("| 60.0 | 55.0 | 70.0 | 50.0")
  assert math.isnan(T.micro_score([])["overall"])
  with pytest.raises(ValueError, match="unknown benchmark"):
    suite.parse_benchmarks("vstar,hrbench4k")
  assert suite.parse_paths("vstar=/a,hrbench_8k=/b.tsv") == {"vstar": "/a", "hrbench_8k": "/b.tsv"}


def test_config_selects_the_new_sources():
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
  from mgpo_jax.configs import base  # pylint: disable=g-import-not-at-top
  from mgpo_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  c = base.get_config()
  c.data.source, c.data.path, c.data.path_prefix = "mgpo_parquet", "/d/train.parquet", "/mnt/a=/data/b"
  c.eval.source, c.eval.path = "hrbench", "/d/hr_bench_4k.tsv"
  config_lib.validate(c)
  assert config_lib.reader_kwargs(c.data) == {"path": "/d/train.parquet", "path_prefix": "/mnt/a=/data/b"}
  assert config_lib.reader_kwargs(c.eval) == {"path": "/d/hr_bench_4k.tsv"}
  c.data.path_prefix = "/mnt/a"
  with pytest.raises(config_lib.ConfigError, match=r"data.path_prefix: '/mnt/a' is not 'OLD=NEW'"):
    config_lib.validate(c)
