"""Small copies of the benchmarks' released layouts (shared/docs/benchmarks.md), built in tests.

File names, keys, column names and types, the base64 encoding of embedded images and the option
order conventions are those of the releases; the contents are a few made-up questions each, with
small random images (the ids, questions and options are the tests' own).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image(w: int, h: int, seed: int, fmt: str = "JPEG") -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def b64(data: bytes) -> str:
  return base64.b64encode(data).decode("ascii")


# ------------------------------------------------------------------------------------------------ V*
# (category, stem, size, annotation). bbox: [[x, y, w, h], ...]; options[0] is the correct one.
VSTAR = [
    ("direct_attributes", "sa_4690", (320, 240),
     {"target_object": ["glove"], "bbox": [[200, 40, 30, 24]], "question": "What is the material of the glove?",
      "options": ["rubber", "cotton", "kevlar", "leather"]}),
    ("direct_attributes", "sa_17", (300, 200),
     {"target_object": ["umbrella"], "bbox": [[10, 150, 40, 30]], "question": "What is the color of the umbrella?",
      "options": ["red", "blue", "green", "yellow"]}),
    ("relative_position", "sa_88", (280, 280),
     {"target_object": ["dog", "car"], "bbox": [[20, 30, 40, 40], [150, 160, 60, 50]],
      "question": "Is the dog on the left or right side of the car?", "options": ["left", "right"]}),
]
# test_questions.jsonl: the same questions, options shuffled and lettered, `label` the correct letter.
VSTAR_JSONL = [
    {"image": "direct_attributes/sa_4690.jpg", "order": [2, 0, 3, 1], "category": "direct_attributes",
     "question_id": 0},
    {"image": "direct_attributes/sa_17.jpg", "order": [0, 1, 2, 3], "category": "direct_attributes", "question_id": 1},
    {"image": "relative_position/sa_88.jpg", "order": [1, 0], "category": "relative_position", "question_id": 2},
]
VSTAR_SUFFIX = "Answer with the option's letter from the given choices directly."


def write_vstar(root, with_jsonl: bool = True) -> None:
  """<root>/<category>/<stem>.jpg + .json, OCR/ (not part of the benchmark), test_questions.jsonl."""
  for i, (cat, stem, (w, h), ann) in enumerate(VSTAR):
    os.makedirs(os.path.join(root, cat), exist_ok=True)
    with open(os.path.join(root, cat, stem + ".jpg"), "wb") as f:
      f.write(image(w, h, i))
    with open(os.path.join(root, cat, stem + ".json"), "w") as f:
      json.dump(ann, f)
  os.makedirs(os.path.join(root, "OCR"), exist_ok=True)
  with open(os.path.join(root, "OCR", "ocr_1.json"), "w") as f:
    json.dump({"question": "What does the sign say?", "options": ["STOP", "GO"]}, f)
  if with_jsonl:
    with open(os.path.join(root, "test_questions.jsonl"), "w") as f:
      for q, (_, _, _, ann) in zip(VSTAR_JSONL, VSTAR):
        opts = [ann["options"][k] for k in q["order"]]
        text = "\n".join([ann["question"], *[f"({'ABCD'[i]}) {o}" for i, o in enumerate(opts)], VSTAR_SUFFIX])
        rec = {"image": q["image"], "text": text, "category": q["category"], "question_id": q["question_id"],
               "label": "ABCD"[q["order"].index(0)]}
        f.write(json.dumps(rec) + "\n")


# ------------------------------------------------------------------------------------------------ HR-Bench
HR_COLUMNS = ["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"]


def hrbench_rows(size=(256, 192)) -> list[dict]:
  """2 questions (one single, one cross) x 4 rotations of their options = 8 rows."""
  rows = []
  questions = [("single", "What is written on the small sign?", ["OPEN", "CLOSED", "EXIT", "SALE"]),
               ("cross", "Which is closer to the tower, the bus or the tree?", ["bus", "tree", "same", "neither"])]
  idx = 0
  for q, (category, question, opts) in enumerate(questions):
    img = b64(image(*size, seed=100 + q))
    for cycle in range(4):
      rotated = opts[cycle:] + opts[:cycle]
      rows.append({"index": idx, "question": question, "A": rotated[0], "B": rotated[1], "C": rotated[2],
                   "D": rotated[3], "answer": "ABCD"[rotated.index(opts[0])], "category": category,
                   "cycle_category": f"cycle{cycle + 1}", "image": img})
      idx += 1
  return rows


def write_hrbench_tsv(path, rows) -> None:
  with open(path, "w", encoding="utf-8", newline="") as f:  # as pandas' to_csv(sep="\t", index=False)
    w = csv.DictWriter(f, HR_COLUMNS, delimiter="\t", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)


def write_hrbench_parquet(path, rows) -> None:
  schema = pa.schema([("index", pa.int64())] + [(c, pa.string()) for c in HR_COLUMNS[1:]])
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


# ------------------------------------------------------------------------------------------------ MME-RealWorld
MME_RECORDS = [
    {"Question_id": "perception/monitoring/Vehicle/counting/0310",
     "Image": "monitoring_images/9999998_00382_d_0000334.jpg",
     "Text": "What is the number of buses in the image?", "Question Type": "Multiple Choice",
     "Answer choices": ["(A) 13", "(B) 90", "(C) 77", "(D) 6", "(E) The image does not feature the buses"],
     "Ground truth": "E", "Task": "Perception", "Subtask": "Monitoring", "Category": "Vehicle/counting"},
    {"Question_id": "reasoning/diagram/0007", "Image": "diagram/chart_7.png",
     "Text": "Which year had the highest revenue?", "Question type": "Multiple Choice",
     "Answer choices": ["(A) 2019", "(B) 2020", "(C) 2021", "(D) 2022", "(E) 2023"],
     "Ground truth": "C", "Task": "Reasoning", "Subtask": "Diagram and Table", "Category": "chart", "Dataset": "x"},
    {"Question_id": "perception/rs/0001", "Image": "remote_sensing/rs_1.jpg", "Text": "How many planes are parked?",
     "Question Type": "Multiple Choice", "Answer choices": ["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) 5"],
     "Ground truth": "B", "Task": "Perception", "Subtask": "Remote Sensing", "Category": "counting"},
]


def write_mme_json(folder, name: str = "MME_RealWorld.json") -> str:
  for i, rec in enumerate(MME_RECORDS):
    path = os.path.join(folder, rec["Image"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(image(240 + 16 * i, 180, 200 + i, "PNG" if path.endswith(".png") else "JPEG"))
  path = os.path.join(folder, name)
  with open(path, "w") as f:
    json.dump(MME_RECORDS, f)
  return path


def write_mme_parquet(folder) -> str:
  """<folder>/data/train-00000-of-00001.parquet, as the lmms-eval variants."""
  rows = [{"index": i, "question": r["Text"], "multi-choice options": r["Answer choices"],
           "answer": r["Ground truth"], "category": f"{r['Task']}/{r['Subtask']}", "l2-category": r["Category"],
           "bytes": b64(image(240, 180, 300 + i))} for i, r in enumerate(MME_RECORDS)]
  schema = pa.schema([("index", pa.int64()), ("question", pa.string()), ("multi-choice options", pa.list_(pa.string())),
                      ("answer", pa.string()), ("category", pa.string()), ("l2-category", pa.string()),
                      ("bytes", pa.string())])
  os.makedirs(os.path.join(folder, "data"), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(folder, "data", "train-00000-of-00001.parquet"))
  return folder


# ------------------------------------------------------------------------------------------------ MGPO parquet
MGPO_ROWS = [
    ("Perception/Monitoring", "What is the number of buses in the image?",
     "(A) 13\n(B) 90\n(C) 77\n(D) 6\n(E) The image does not feature the buses", "E"),
    ("v_star", "What is the material of the glove?", "(A) kevlar\n(B) rubber\n(C) leather\n(D) cotton", "B"),
    ("Reasoning/Diagram and Table", "Which year had the highest revenue?", "(A) 2019\n(B) 2020\n(C) 2021", "C"),
]
AUTHORS_PREFIX = "/mnt/authors/disk/mme_realworld"


def write_mgpo_parquet(path, image_dir) -> None:
  """The authors' verl columns; image_path names their disks (AUTHORS_PREFIX/<file>), the same
  images are under `image_dir`."""
  rows = []
  for i, (source, question, choices, gt) in enumerate(MGPO_ROWS):
    data = image(224, 160, 400 + i)
    name = f"img_{i}.jpg"
    with open(os.path.join(image_dir, name), "wb") as f:
      f.write(data)
    rows.append({"prompt": f"<image>{question}\n{choices}", "image": {"bytes": data, "path": name},
                 "image_path": f"{AUTHORS_PREFIX}/{name}", "question": question, "choices": choices,
                 "data_source": source, "extra_info": {"index": i, "split": "train"},
                 "reward_model": {"ground_truth": gt, "style": "rule"}})
  schema = pa.schema([
      ("prompt", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
      ("image_path", pa.string()), ("question", pa.string()), ("choices", pa.string()),
      ("data_source", pa.string()), ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
      ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())]))])
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
