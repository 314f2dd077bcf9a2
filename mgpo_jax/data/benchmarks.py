"""Readers of the evaluation benchmarks and training sets in the layouts their authors release.

Every reader yields `schema.Sample`s lazily (one row at a time; a base64 image is decoded from its
row only when that row is reached) and never opens an image file: the input pipeline decodes and
guards images, files and embedded bytes alike. A bad row (unknown answer letter, undecodable base64,
missing keys) is skipped with one log line and, when the caller passes a `BadRows`, counted there;
a missing image file is kept as a path so the pipeline reports and skips it (the evaluator counts
those too). What is known of each release is gathered in shared/docs/benchmarks.md.

V* Bench (`craigwu/vstar_bench`; `read_vstar`, source "vstar")::

  huggingface-cli download craigwu/vstar_bench --repo-type dataset --local-dir /data/vstar_bench

  <root>/direct_attributes/<stem>.jpg + <stem>.json     115 questions
  <root>/relative_position/<stem>.jpg + <stem>.json      76 questions
  <root>/test_questions.jsonl                             191 lines

  Per-image JSON: {"target_object": [str, ...], "bbox": [[x, y, w, h], ...], "question": str,
  "options": [str, ...]} with NO answer field: `options[0]` is the correct option. Without the
  JSONL the options are shuffled (seeded by the sample id, so every run asks the same) and the
  answer is the letter where `options[0]` lands. With `test_questions.jsonl` its lettered, shuffled
  options and `label` are used as released (the order lmms-eval asks), and the bbox is taken from
  the per-image JSON next to the image. `target_box` is the union of the `bbox`es, as
  [x1, y1, x2, y2] (for the eval's target-in-box rate). Other folders of the repository (OCR/,
  GPT4V-hard/) are not part of the 191 and are skipped. `root` may also name the JSONL file or the
  lmms-lab/vstar-bench parquet (columns image, text, label, question_id, category; no bbox).
  Sample id: "vstar/<category>/<stem>"; category: the folder.

HR-Bench 4K / 8K (`DreamMr/HR-Bench`; `read_hrbench`, source "hrbench")::

  huggingface-cli download DreamMr/HR-Bench --repo-type dataset --local-dir /data/HR-Bench

  hr_bench_4k.tsv / hr_bench_8k.tsv (tab-separated, header) or hr_bench_4k.parquet / ..._8k.parquet,
  800 rows each: index, question, A, B, C, D, answer (letter), category ("single" / "cross"),
  cycle_category, image (base64 string). Sample id: "<file stem>/<index>"; category:
  "<category>/<cycle_category>" (the benchmark's score is per cycle_category, see eval.table).
  The values of cycle_category are not known; any string works. A parquet `image` held as binary or
  as an HF image struct ({bytes, path}) is accepted too (unverified which the release uses).

MME-RealWorld full / Lite (`read_mme_realworld`, source "mme_realworld"): the path picks the layout:

  *.json: the released JSON list (full: MME_RealWorld.json; Lite: the JSON of data.zip) with images
    under `image_root` (default: the JSON's folder): {"Question_id", "Image", "Text",
    "Answer choices": ["(A) ...", ...], "Ground truth": "A", "Task", "Subtask", "Category", ...}.
  *.parquet or a folder of them: the lmms-eval variants (yifanzhang114/MME-RealWorld-Lmms-eval,
    ...-lite-lmms-eval: data/train-*.parquet): index, question, "multi-choice options", answer,
    category ("Perception/Monitoring"), l2-category, bytes (the image, base64).
  Sample id: "mme_realworld/<Question_id or index>"; category: "<Task>/<Subtask>" (JSON records
  without Task: "<Category>/<Subtask>", as before).

The MGPO authors' training / validation parquet (`read_mgpo_parquet`, source "mgpo_parquet";
xinyu1205/mme_realworld_train_21690, xinyu1205/mme_realworld_lite_1919_vstar_191_sum_2110): prompt,
image ({bytes, path}), image_path, question, choices (str), data_source, extra_info ({index, ...}),
reward_model ({ground_truth, ...}). `prompt` is ignored (our prompts are rendered from question and
choices). The image is the embedded `image.bytes`, or, with `path_prefix="OLD=NEW"`, the file
`image_path` with its leading OLD replaced by NEW (the authors' full-resolution files, on their own
disks). The string format of `choices` is unverified: a JSON / Python list, "(A) x (B) y" or
"A. x" lines are read. Sample id: "mgpo/<data_source>/<extra_info.index or row>"; category:
data_source.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import glob
import json
import logging
import os
import random
import re
import sys
from typing import Any, Iterable, Iterator, Mapping, Sequence

from mgpo_jax.data import schema

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BadRows:
  """Rows a reader skipped: each logged once, all counted (the eval output reports them)."""

  rows: list[dict[str, str]] = dataclasses.field(default_factory=list)

  def add(self, where: str, reason: str) -> None:
    logger.warning("skipping %s: %s", where, reason)
    self.rows.append({"where": where, "reason": reason})

  def __len__(self) -> int:
    return len(self.rows)


class _Skip(ValueError):
  """A row that cannot become a sample (caught per row by the readers)."""


def answer_letter(answer: Any, choices: Sequence[str]) -> str:
  """Option letter for an answer given as 'B', '(B)' or the exact text of an option."""
  a = str(answer).strip()
  m = re.fullmatch(r"\(?([A-Z])\)?", a)
  if m and m.group(1) in schema.OPTION_LETTERS[: len(choices)]:
    return m.group(1)
  if a in choices:
    return schema.letter(list(choices).index(a))
  raise _Skip(f"answer {answer!r} is neither an option letter of {len(choices)} options nor an option text")


def _rows_of(records: Iterable[tuple[str, Any]], bad_rows: BadRows | None, make) -> Iterator[schema.Sample]:
  """Applies `make(where, record)` to each record; bad ones are logged (and counted) and skipped."""
  bad_rows = BadRows() if bad_rows is None else bad_rows
  for where, record in records:
    try:
      sample = schema.normalize_sample(make(where, record))
    except (_Skip, ValueError, KeyError, TypeError) as e:
      reason = f"missing key {e}" if isinstance(e, KeyError) else str(e)
      bad_rows.add(where, reason)
      continue
    yield sample


# ------------------------------------------------------------------------------------------------
# Images embedded in rows.
# ------------------------------------------------------------------------------------------------

# Leading bytes of the encoded formats Pillow reads here; anything else is taken for base64 text.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def image_bytes(value: Any) -> bytes:
  """Encoded image bytes of an embedded image: a base64 string, raw (or base64) bytes, or an HF
  image struct {"bytes": ..., "path": ...}. Raises _Skip when there are none or base64 is broken."""
  if isinstance(value, Mapping):
    value = value.get("bytes")
  if value is None or (isinstance(value, (str, bytes)) and not value):
    raise _Skip("no embedded image")
  if isinstance(value, (bytes, bytearray, memoryview)):
    value = bytes(value)
    if value.startswith(_IMAGE_MAGIC):
      return value
  try:
    return base64.b64decode(value, validate=True)
  except (binascii.Error, ValueError, TypeError) as e:
    if isinstance(value, (str, bytes)) and len(value.split()) > 1:  # wrapped lines: drop the whitespace
      return image_bytes(type(value)().join(value.split()))
    raise _Skip(f"undecodable base64 image ({e})") from None


# ------------------------------------------------------------------------------------------------
# Parquet.
# ------------------------------------------------------------------------------------------------


def parquet_files(path: str) -> list[str]:
  """`path` itself, or the *.parquet files below the folder `path` in sorted order."""
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not files:
      raise ValueError(f"no .parquet files under {path!r}")
    return files
  if not os.path.isfile(path):
    raise ValueError(f"{path!r} does not exist")
  return [path]


def iter_parquet(path: str, batch_rows: int = 16) -> Iterator[tuple[str, dict[str, Any]]]:
  """(where, row dict) for every row of the parquet file(s), read a few rows at a time."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  # only the parquet readers need it

  for file in parquet_files(path):
    row = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_rows):
      for record in batch.to_pylist():
        yield f"{file}[{row}]", record
        row += 1


# ------------------------------------------------------------------------------------------------
# V* Bench.
# ------------------------------------------------------------------------------------------------

VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
VSTAR_QUESTIONS = "test_questions.jsonl"
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_LETTERED = re.compile(r"^\s*\(([A-J])\)\s*(.*?)\s*$")


def parse_lettered(text: str) -> tuple[str, list[str]]:
  """("question", [options]) of a V* `text`: the question, then one "(A) option" line per option,
  then the answer-format instruction (dropped)."""
  lines = str(text).split("\n")
  first = next((i for i, l in enumerate(lines) if _LETTERED.match(l)), None)
  if first is None:
    raise _Skip("no '(A) ...' option lines in the question text")
  options = []
  for line in lines[first:]:
    m = _LETTERED.match(line)
    if m is None or m.group(1) != schema.OPTION_LETTERS[len(options)]:
      break
    options.append(m.group(2))
  return "\n".join(lines[:first]).strip(), options


def xywh_union(boxes: Any) -> list[int] | None:
  """[x1, y1, x2, y2] (right/bottom exclusive) around V*'s [[x, y, w, h], ...]; None if none."""
  if not boxes:
    return None
  if not isinstance(boxes[0], (list, tuple)):
    boxes = [boxes]
  xyxy = []
  for b in boxes:
    if len(b) != 4:
      raise _Skip(f"bbox {b!r} is not [x, y, w, h]")
    x, y, w, h = (float(v) for v in b)
    xyxy.append((x, y, x + w, y + h))
  return [int(round(min(b[0] for b in xyxy))), int(round(min(b[1] for b in xyxy))),
          int(round(max(b[2] for b in xyxy))), int(round(max(b[3] for b in xyxy)))]


def _load_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise _Skip(f"not valid JSON ({e.msg})") from None


def _shuffled(options: Sequence[str], key: str, seed: int) -> tuple[list[str], str]:
  """Options in a fixed random order per `key` (options[0] is the correct one) and its letter."""
  order = list(range(len(options)))
  random.Random(f"{seed}:{key}").shuffle(order)
  return [options[i] for i in order], schema.letter(order.index(0))


def read_vstar(root: str | os.PathLike, bad_rows: BadRows | None = None, shuffle_seed: int = 0
               ) -> Iterator[schema.Sample]:
  """V* Bench samples (layouts in the module docstring), in the release's order."""
  root = os.path.abspath(os.fspath(root))
  if os.path.isfile(root) and root.endswith(".parquet"):
    return _rows_of(iter_parquet(root), bad_rows, _vstar_parquet_row)
  if os.path.isfile(root):
    return _rows_of(_jsonl_records(root), bad_rows, _vstar_lettered_row(os.path.dirname(root)))
  if not os.path.isdir(root):
    raise ValueError(f"V* root {root!r} is not a folder")
  if os.path.isfile(os.path.join(root, VSTAR_QUESTIONS)):
    return _rows_of(_jsonl_records(os.path.join(root, VSTAR_QUESTIONS)), bad_rows, _vstar_lettered_row(root))
  return _rows_of(_vstar_annotations(root), bad_rows, _vstar_annotation_row(shuffle_seed))


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        yield f"{path}:{lineno}", line


def _vstar_annotations(root: str) -> Iterator[tuple[str, str]]:
  """Per-image JSON paths of the benchmark's category folders (others are named once and skipped)."""
  folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  others = [d for d in folders if d not in VSTAR_CATEGORIES]
  if others:
    logger.info("V*: folders %s are not part of the benchmark's %s; skipped", others, VSTAR_CATEGORIES)
  for category in folders:
    if category not in VSTAR_CATEGORIES:
      continue
    for fname in sorted(os.listdir(os.path.join(root, category))):
      if fname.endswith(".json"):
        path = os.path.join(root, category, fname)
        yield path, path


def _image_next_to(annotation: str) -> str:
  """The image whose annotation is `annotation` (same stem); the .jpg name when none exists."""
  stem = os.path.splitext(annotation)[0]
  return next((stem + e for e in _IMAGE_EXTS if os.path.isfile(stem + e)), stem + ".jpg")


def _vstar_annotation_row(seed: int):
  def make(where: str, path: str) -> dict[str, Any]:
    meta = _load_json(path)
    category = os.path.basename(os.path.dirname(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    sid = f"vstar/{category}/{stem}"
    options = schema.choices_from(meta["options"])
    if "answer" in meta:  # our earlier V*-like format: the answer is given, the order kept
      choices, answer = options, answer_letter(meta["answer"], options)
    else:  # the release: options[0] is correct
      if len(options) < schema.MIN_CHOICES:
        raise _Skip(f"needs at least {schema.MIN_CHOICES} options, got {len(options)}")
      choices, answer = _shuffled(options, sid, seed)
    box = xywh_union(meta.get("bbox")) if meta.get("bbox") is not None else meta.get("target_box")
    return {schema.ID: sid, schema.QUESTION: meta["question"], schema.CHOICES: choices,
            schema.ANSWER: answer, schema.CATEGORY: category, schema.IMAGE_PATH: _image_next_to(path),
            schema.TARGET_BOX: box}
  return make


def _vstar_lettered_row(root: str):
  def make(where: str, line: str) -> dict[str, Any]:
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise _Skip(f"not valid JSON ({e.msg})") from None
    question, choices = parse_lettered(rec["text"])
    image = os.path.normpath(os.path.join(root, rec["image"]))
    stem = os.path.splitext(os.path.basename(image))[0]
    category = rec.get("category") or os.path.basename(os.path.dirname(image))
    annotation = os.path.splitext(image)[0] + ".json"
    box = None
    if os.path.isfile(annotation):
      try:
        box = xywh_union(_load_json(annotation).get("bbox"))
      except _Skip as e:
        logger.warning("V*: no target box from %s: %s", annotation, e)
    return {schema.ID: f"vstar/{category}/{stem}", schema.QUESTION: question, schema.CHOICES: choices,
            schema.ANSWER: answer_letter(rec["label"], choices), schema.CATEGORY: category,
            schema.IMAGE_PATH: image, schema.TARGET_BOX: box}
  return make


def _vstar_parquet_row(where: str, rec: Mapping[str, Any]) -> dict[str, Any]:
  question, choices = parse_lettered(rec["text"])
  return {schema.ID: f"vstar/{rec['category']}/{rec['question_id']}", schema.QUESTION: question,
          schema.CHOICES: choices, schema.ANSWER: answer_letter(rec["label"], choices),
          schema.CATEGORY: rec["category"], schema.IMAGE: image_bytes(rec["image"])}


# ------------------------------------------------------------------------------------------------
# HR-Bench.
# ------------------------------------------------------------------------------------------------

HRBENCH_OPTIONS = ("A", "B", "C", "D")


def read_hrbench(path: str | os.PathLike, bad_rows: BadRows | None = None) -> Iterator[schema.Sample]:
  """HR-Bench samples of one .tsv or .parquet file (layout in the module docstring), in file order."""
  path = os.fspath(path)
  stem = os.path.splitext(os.path.basename(path))[0]
  rows = iter_parquet(path) if path.endswith(".parquet") else _iter_tsv(path)

  def make(where: str, rec: Mapping[str, Any]) -> dict[str, Any]:
    choices = [str(rec[k]) for k in HRBENCH_OPTIONS if rec.get(k) not in (None, "")]
    return {schema.ID: f"{stem}/{rec['index']}", schema.QUESTION: rec["question"], schema.CHOICES: choices,
            schema.ANSWER: answer_letter(rec["answer"], choices),
            schema.CATEGORY: f"{rec['category']}/{rec['cycle_category']}", schema.IMAGE: image_bytes(rec["image"])}
  return _rows_of(rows, bad_rows, make)


def _iter_tsv(path: str) -> Iterator[tuple[str, dict[str, str]]]:
  """Rows of a tab-separated file with a header (pandas' default quoting), one at a time."""
  if not os.path.isfile(path):
    raise ValueError(f"{path!r} does not exist")
  csv.field_size_limit(sys.maxsize)  # one field is a whole base64 image
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f, delimiter="\t")
    for row in reader:
      yield f"{path}:{reader.line_num}", row


# ------------------------------------------------------------------------------------------------
# MME-RealWorld.
# ------------------------------------------------------------------------------------------------

_MME_KEYS = ("Question_id", "Image", "Text", "Answer choices", "Ground truth")


def read_mme_realworld(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                       bad_rows: BadRows | None = None) -> Iterator[schema.Sample]:
  """MME-RealWorld (full or Lite) from its JSON list + image folder, or its lmms-eval parquet."""
  path = os.fspath(path)
  if path.endswith(".json"):
    return _read_mme_json(path, image_root, bad_rows)
  return _rows_of(iter_parquet(path), bad_rows, _mme_parquet_row)


def _read_mme_json(path: str, image_root, bad_rows) -> Iterator[schema.Sample]:
  root = os.path.abspath(os.fspath(image_root) if image_root else os.path.dirname(path) or ".")
  with open(path, encoding="utf-8") as f:
    try:
      entries = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
  if not isinstance(entries, list):
    raise ValueError(f"{path}: expected a JSON list of questions, got {type(entries).__name__}")

  def make(where: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in _MME_KEYS if k not in entry]
    if missing:
      raise _Skip(f"missing key(s) {missing}")
    choices = schema.choices_from(entry["Answer choices"])
    first = "Task" if entry.get("Task") else "Category"
    category = "/".join(str(entry[k]) for k in (first, "Subtask") if entry.get(k))
    image = str(entry["Image"])
    return {schema.ID: f"mme_realworld/{entry['Question_id']}", schema.QUESTION: entry["Text"],
            schema.CHOICES: choices, schema.ANSWER: answer_letter(entry["Ground truth"], choices),
            schema.CATEGORY: category or "unknown",
            schema.IMAGE_PATH: image if os.path.isabs(image) else os.path.normpath(os.path.join(root, image))}
  return _rows_of(((f"{path}[{i}]", e) for i, e in enumerate(entries)), bad_rows, make)


def _mme_parquet_row(where: str, rec: Mapping[str, Any]) -> dict[str, Any]:
  choices = schema.choices_from(list(rec["multi-choice options"]))
  return {schema.ID: f"mme_realworld/{rec['index']}", schema.QUESTION: rec["question"], schema.CHOICES: choices,
          schema.ANSWER: answer_letter(rec["answer"], choices), schema.CATEGORY: rec["category"],
          schema.IMAGE: image_bytes(rec["bytes"])}


# ------------------------------------------------------------------------------------------------
# The MGPO authors' parquet.
# ------------------------------------------------------------------------------------------------

_INLINE_LETTER = re.compile(r"\(([A-J])\)")
_LINE_LETTER = re.compile(r"(?m)^\s*\(?([A-J])[.:)]\s*(.*?)\s*$")


def parse_choices(text: Any) -> list[str]:
  """Option texts of a `choices` value: a list, a JSON / Python list literal, "(A) x (B) y" or
  "A. x" lines. Raises _Skip when fewer than two options are found."""
  if isinstance(text, (list, tuple)):
    return schema.choices_from([str(c) for c in text])
  s = str(text).strip()
  if s.startswith("["):
    for parse in (json.loads, ast.literal_eval):
      try:
        value = parse(s)
      except (ValueError, SyntaxError):
        continue
      if isinstance(value, list):
        return schema.choices_from([str(c) for c in value])
  options: list[str] = []
  marks = []
  for m in _INLINE_LETTER.finditer(s):  # "(A) x (B) y ...", markers in letter order
    if m.group(1) == schema.OPTION_LETTERS[len(marks)]:
      marks.append(m)
  if len(marks) >= schema.MIN_CHOICES:
    ends = [m.start() for m in marks[1:]] + [len(s)]
    options = [s[m.end():e].strip().rstrip(",;").strip() for m, e in zip(marks, ends)]
  else:
    for m in _LINE_LETTER.finditer(s):
      if m.group(1) != schema.OPTION_LETTERS[len(options)]:
        break
      options.append(m.group(2))
  if len(options) < schema.MIN_CHOICES:
    raise _Skip(f"cannot read the options of choices={s[:80]!r}")
  return options


def _field(rec: Mapping[str, Any], dotted: str) -> Any:
  """rec["a"]["b"] for "a.b" (nested struct columns), or a flattened rec["a.b"]."""
  if dotted in rec:
    return rec[dotted]
  head, _, tail = dotted.partition(".")
  value = rec[head]
  return _field(value, tail) if tail else value


def read_mgpo_parquet(path: str | os.PathLike, path_prefix: str = "", bad_rows: BadRows | None = None
                      ) -> Iterator[schema.Sample]:
  """The MGPO authors' training / validation parquet (layout in the module docstring)."""
  path = os.fspath(path)
  old = new = None
  if path_prefix:
    if "=" not in path_prefix:
      raise ValueError(f"path_prefix must be 'OLD=NEW', got {path_prefix!r}")
    old, new = path_prefix.split("=", 1)

  def make(where: str, rec: Mapping[str, Any]) -> dict[str, Any]:
    choices = parse_choices(rec["choices"])
    source = str(rec["data_source"])
    try:
      index = _field(rec, "extra_info.index")
    except (KeyError, TypeError):
      index = where.rsplit("[", 1)[-1].rstrip("]")
    out = {schema.ID: f"mgpo/{source}/{index}", schema.QUESTION: rec["question"], schema.CHOICES: choices,
           schema.ANSWER: answer_letter(_field(rec, "reward_model.ground_truth"), choices),
           schema.CATEGORY: source}
    if old is not None:
      image_path = str(rec["image_path"])
      out[schema.IMAGE_PATH] = new + image_path[len(old):] if image_path.startswith(old) else image_path
    else:
      out[schema.IMAGE] = image_bytes(rec["image"])
    return out
  return _rows_of(iter_parquet(path), bad_rows, make)
