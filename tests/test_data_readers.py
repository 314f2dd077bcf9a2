"""Tests of the local dataset readers (JSONL, V* Bench style, MME-RealWorld style); the released
layouts are tested in test_benchmarks.py."""

import json
import os

import pytest
from PIL import Image

from mgpo_jax.data import benchmarks
from mgpo_jax.data import readers
from mgpo_jax.data import schema
from mgpo_jax.data import synthetic

SMALL = synthetic.SyntheticConfig(image_size=(96, 112), target_size=(10, 14))


def _save_image(path, size=(40, 30), color=(10, 200, 30)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, color).save(path)


def _write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def test_jsonl_round_trip_resolves_relative_paths(tmp_path):
  samples = synthetic.generate_split(3, 0, SMALL)
  path = tmp_path / "data" / "train.jsonl"
  path.parent.mkdir()
  assert readers.write_jsonl(samples, path) == 3
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  assert all(not os.path.isabs(l[schema.IMAGE_PATH]) for l in lines)

  back = list(readers.read_jsonl(path))
  assert [s[schema.ID] for s in back] == [s[schema.ID] for s in samples]
  for orig, got in zip(samples, back):
    assert os.path.isabs(got[schema.IMAGE_PATH])
    with open(got[schema.IMAGE_PATH], "rb") as f:
      assert f.read() == orig[schema.IMAGE]
    for k in (schema.QUESTION, schema.CHOICES, schema.ANSWER, schema.CATEGORY, schema.TARGET_BOX):
      assert got[k] == orig[k]


def test_jsonl_bad_line_names_the_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  good = {"id": "a", "question": "q", "choices": ["x", "y"], "answer": "A", "category": "c", "image_path": "a.png"}
  path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": "E"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: .*answer 'E'"):
    list(readers.read_jsonl(path))
  path.write_text("{not json\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
    list(readers.read_jsonl(path))


def _vstar_fixture(root):
  _save_image(root / "direct_attributes" / "sa_1.jpg")
  _write_json(
      root / "direct_attributes" / "sa_1.json",
      {"question": "What is the color of the cup?", "options": ["(A) red", "(B) green", "(C) blue", "(D) white"],
       "answer": "B", "target_box": [1, 2, 10, 12]},
  )
  _save_image(root / "relative_position" / "sa_2.png", size=(50, 50))
  _write_json(
      root / "relative_position" / "sa_2.json",
      {"question": "Is the dog left or right of the car?", "options": ["left", "right"], "answer": "right"},
  )
  # A question whose image is missing: kept as a path, the pipeline reports and skips it.
  _write_json(
      root / "relative_position" / "sa_3.json",
      {"question": "Where?", "options": ["up", "down"], "answer": "(A)"},
  )
  (root / "README.txt").write_text("not a category")


def test_vstar_reader(tmp_path):
  root = tmp_path / "vstar"
  _vstar_fixture(root)
  got = list(readers.read_vstar(root))
  assert [s[schema.ID] for s in got] == [
      "vstar/direct_attributes/sa_1", "vstar/relative_position/sa_2", "vstar/relative_position/sa_3"
  ]
  a, b, c = got
  assert a[schema.CHOICES] == ["red", "green", "blue", "white"]
  assert a[schema.ANSWER] == "B" and a[schema.CATEGORY] == "direct_attributes"
  assert a[schema.IMAGE_PATH] == str(root / "direct_attributes" / "sa_1.jpg")
  assert a[schema.TARGET_BOX] == [1, 2, 10, 12]
  assert b[schema.ANSWER] == "B" and b[schema.IMAGE_PATH].endswith("sa_2.png")
  assert schema.TARGET_BOX not in b
  assert c[schema.ANSWER] == "A" and not os.path.exists(c[schema.IMAGE_PATH])
  # The same samples through the registry.
  assert list(readers.read_source("vstar", root=str(root))) == got


def test_vstar_bad_rows_are_skipped_and_counted(tmp_path):
  root = tmp_path / "vstar"
  _write_json(root / "direct_attributes" / "x.json", {"question": "q", "options": ["a", "b"], "answer": "purple"})
  _write_json(root / "direct_attributes" / "y.json", {"options": ["a", "b"]})
  _write_json(root / "direct_attributes" / "z.json", {"question": "q", "options": ["a", "b"], "answer": "b"})
  bad = benchmarks.BadRows()
  got = list(readers.read_vstar(root, bad_rows=bad))
  assert [s[schema.ID] for s in got] == ["vstar/direct_attributes/z"]
  assert [os.path.basename(r["where"]) for r in bad.rows] == ["x.json", "y.json"]
  assert "answer 'purple'" in bad.rows[0]["reason"] and "question" in bad.rows[1]["reason"]
  with pytest.raises(ValueError, match="not a folder"):
    list(readers.read_vstar(tmp_path / "nope"))


def test_mme_realworld_reader(tmp_path):
  _save_image(tmp_path / "imgs" / "rs" / "1.jpg")
  entries = [
      {"Question_id": "perception/rs/0001", "Image": "rs/1.jpg", "Text": "How many planes?",
       "Answer choices": ["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) 5"], "Ground truth": "C",
       "Category": "Perception", "Subtask": "Remote Sensing"},
      {"Question_id": 7, "Image": "rs/2.jpg", "Text": "What colour?",
       "Answer choices": ["(A) red", "(B) blue"], "Ground truth": "(B)", "Subtask": "Color"},
  ]
  _write_json(tmp_path / "meta" / "MME_RealWorld.json", entries)
  got = list(readers.read_mme_realworld(tmp_path / "meta" / "MME_RealWorld.json", image_root=tmp_path / "imgs"))
  a, b = got
  assert a[schema.ID] == "mme_realworld/perception/rs/0001"
  assert a[schema.QUESTION] == "How many planes?"
  assert a[schema.CHOICES] == ["1", "2", "3", "4", "5"] and a[schema.ANSWER] == "C"
  assert a[schema.CATEGORY] == "Perception/Remote Sensing"
  assert a[schema.IMAGE_PATH] == str(tmp_path / "imgs" / "rs" / "1.jpg")
  assert b[schema.ID] == "mme_realworld/7" and b[schema.ANSWER] == "B" and b[schema.CATEGORY] == "Color"
  # Default image root: the JSON file's folder.
  c = next(readers.read_mme_realworld(tmp_path / "meta" / "MME_RealWorld.json"))
  assert c[schema.IMAGE_PATH] == str(tmp_path / "meta" / "rs" / "1.jpg")


def test_mme_realworld_bad_input(tmp_path):
  p = tmp_path / "m.json"
  _write_json(p, [{"Question_id": 1, "Image": "x.jpg", "Text": "q", "Answer choices": ["(A) a", "(B) b"]}])
  bad = benchmarks.BadRows()
  assert list(readers.read_mme_realworld(p, bad_rows=bad)) == []
  assert bad.rows[0]["where"].endswith("m.json[0]") and bad.rows[0]["reason"] == "missing key(s) ['Ground truth']"
  _write_json(p, {"not": "a list"})
  with pytest.raises(ValueError, match="expected a JSON list"):
    list(readers.read_mme_realworld(p))


def test_unknown_source_kind():
  with pytest.raises(ValueError, match="unknown source kind 'csv'"):
    readers.read_source("csv")


@pytest.mark.parametrize(
    "text, want",
    [("(A) red", "red"), ("B. two words", "two words"), ("C) x", "x"), ("A man", "A man"), ("  plain ", "plain")],
)
def test_strip_option_prefix(text, want):
  assert schema.strip_option_prefix(text) == want


def test_normalize_sample_errors():
  base = {"id": "s", "question": "q", "choices": ["a", "b"], "answer": "A", "category": "c"}
  with pytest.raises(ValueError, match="exactly one of"):
    schema.normalize_sample(base)
  with pytest.raises(ValueError, match="exactly one of"):
    schema.normalize_sample({**base, "image": b"x", "image_path": "p"})
  with pytest.raises(ValueError, match=r"missing field\(s\) \['question'\]"):
    schema.normalize_sample({k: v for k, v in base.items() if k != "question"} | {"image": b"x"})
  with pytest.raises(ValueError, match="choices"):
    schema.normalize_sample({**base, "choices": ["a"], "image": b"x"})
  got = schema.normalize_sample({**base, "id": b"s", "choices": [b"a", b"b"], "image": b"x",
                                 "target_box": list(schema.NO_BOX)})
  assert got == {**base, "image": b"x"}
