"""Readers that turn local datasets into the common sample schema (`schema.Sample`).

Readers never open images: they yield absolute `image_path`s (or encoded bytes for the synthetic
source), and the input pipeline decodes, guards and — if need be — skips them. Every reader is
registered by `SourceKind` in `READERS`, which the TFDS builder uses to pick one by name.

Formats
-------
JSONL (`SourceKind.JSONL`): one sample per line in the schema of `schema.py`, with `image_path`
relative to the JSONL file's folder (absolute paths are kept). `write_jsonl` writes this format.

V* Bench style (`SourceKind.VSTAR`), close to the released V* Bench layout::

  <root>/<category>/<name>.jpg     (also .jpeg / .png / .webp)
  <root>/<category>/<name>.json    {"question": str, "options": [str, ...], "answer": str,
                                    optional "target_box": [x1, y1, x2, y2]}

  `options` may carry "(A) " prefixes (stripped); `answer` is an option letter ("B" or "(B)") or
  the exact text of one option. Sample id: "vstar/<category>/<name>"; category: the folder name.
  An image missing next to its JSON is kept as a path so the pipeline reports and skips it.

MME-RealWorld style (`SourceKind.MME_REALWORLD`): ONE JSON file holding a list of::

  {"Question_id": str|int, "Image": "<path relative to image_root>", "Text": question,
   "Answer choices": ["(A) ...", "(B) ...", ...], "Ground truth": "A",
   "Category": str, "Subtask": str}

  `image_root` defaults to the JSON file's folder. Sample id: "mme_realworld/<Question_id>";
  category: "<Category>/<Subtask>" (whichever are present).
"""

from __future__ import annotations

import enum
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator

from mgpo_jax.data import scenes
from mgpo_jax.data import schema
from mgpo_jax.data import synthetic


class SourceKind(enum.StrEnum):
  JSONL = "jsonl"
  SYNTHETIC = "synthetic"
  SCENES = "scenes"
  VSTAR = "vstar"
  MME_REALWORLD = "mme_realworld"


Reader = Callable[..., Iterator[schema.Sample]]

# Readers by source kind, filled by @register_reader.
READERS: dict[SourceKind, Reader] = {}


def register_reader(kind: SourceKind) -> Callable[[Reader], Reader]:
  def deco(fn: Reader) -> Reader:
    READERS[SourceKind(kind)] = fn
    return fn

  return deco


def read_source(kind: SourceKind | str, **kwargs: Any) -> Iterator[schema.Sample]:
  """Samples of the source `kind`, read with the reader's keyword arguments."""
  try:
    reader = READERS[SourceKind(kind)]
  except ValueError:
    raise ValueError(f"unknown source kind {kind!r}; known: {[str(k) for k in READERS]}") from None
  return reader(**kwargs)


def _resolve(path: str, base_dir: str) -> str:
  return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


@register_reader(SourceKind.JSONL)
def read_jsonl(path: str | os.PathLike) -> Iterator[schema.Sample]:
  """Samples of a JSONL file; relative `image_path`s are resolved against the file's folder."""
  path = os.fspath(path)
  base = os.path.dirname(os.path.abspath(path))
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
      if schema.IMAGE in record:
        raise ValueError(f"{path}:{lineno}: JSONL samples reference images by {schema.IMAGE_PATH!r}")
      try:
        sample = schema.normalize_sample(record)
      except ValueError as e:
        raise ValueError(f"{path}:{lineno}: {e}") from None
      sample[schema.IMAGE_PATH] = _resolve(sample[schema.IMAGE_PATH], base)
      yield sample


@register_reader(SourceKind.SYNTHETIC)
def read_synthetic(
    n: int, seed: int, config: synthetic.SyntheticConfig = synthetic.SyntheticConfig()
) -> Iterator[schema.Sample]:
  """`n` generated samples (see `synthetic.iter_split`)."""
  return synthetic.iter_split(n, seed, config)


@register_reader(SourceKind.SCENES)
def read_scenes(n: int, seed: int, config: scenes.SceneConfig = scenes.SceneConfig()) -> Iterator[schema.Sample]:
  """`n` generated scene questions (see `scenes.iter_split`): the laptop-scale task."""
  return scenes.iter_split(n, seed, config)


def _answer_letter(answer: Any, choices: list[str], where: str) -> str:
  """Option letter for an answer given as 'B', '(B)' or the text of an option."""
  a = str(answer).strip()
  m = re.fullmatch(r"\(?([A-Z])\)?", a)
  if m and m.group(1) in schema.OPTION_LETTERS[: len(choices)]:
    return m.group(1)
  if a in choices:
    return schema.letter(choices.index(a))
  raise ValueError(f"{where}: answer {answer!r} is neither an option letter nor an option text")


_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@register_reader(SourceKind.VSTAR)
def read_vstar(root: str | os.PathLike) -> Iterator[schema.Sample]:
  """Samples of a V* Bench style folder (format in the module docstring), in sorted order."""
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise ValueError(f"V* root {root!r} is not a folder")
  for category in sorted(os.listdir(root)):
    cat_dir = os.path.join(root, category)
    if not os.path.isdir(cat_dir):
      continue
    names = sorted(os.listdir(cat_dir))
    present = set(names)
    for fname in names:
      stem, ext = os.path.splitext(fname)
      if ext != ".json":
        continue
      where = os.path.join(cat_dir, fname)
      with open(where, encoding="utf-8") as f:
        try:
          meta = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      missing = [k for k in ("question", "options", "answer") if k not in meta]
      if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
      choices = schema.choices_from(meta["options"])
      image = next((stem + e for e in _IMAGE_EXTS if stem + e in present), stem + ".jpg")
      record = {
          schema.ID: f"vstar/{category}/{stem}",
          schema.QUESTION: meta["question"],
          schema.CHOICES: choices,
          schema.ANSWER: _answer_letter(meta["answer"], choices, where),
          schema.CATEGORY: category,
          schema.IMAGE_PATH: os.path.join(cat_dir, image),
      }
      if meta.get("target_box") is not None:
        record[schema.TARGET_BOX] = meta["target_box"]
      try:
        yield schema.normalize_sample(record)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


_MME_KEYS = ("Question_id", "Image", "Text", "Answer choices", "Ground truth")


@register_reader(SourceKind.MME_REALWORLD)
def read_mme_realworld(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> Iterator[schema.Sample]:
  """Samples of an MME-RealWorld style JSON list (format in the module docstring)."""
  path = os.fspath(path)
  image_root = os.path.abspath(os.fspath(image_root) if image_root is not None else os.path.dirname(path) or ".")
  with open(path, encoding="utf-8") as f:
    try:
      entries = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
  if not isinstance(entries, list):
    raise ValueError(f"{path}: expected a JSON list of questions, got {type(entries).__name__}")
  for i, entry in enumerate(entries):
    where = f"{path}[{i}]"
    missing = [k for k in _MME_KEYS if k not in entry]
    if missing:
      raise ValueError(f"{where}: missing key(s) {missing}")
    choices = schema.choices_from(entry["Answer choices"])
    category = "/".join(str(entry[k]) for k in ("Category", "Subtask") if entry.get(k))
    record = {
        schema.ID: f"mme_realworld/{entry['Question_id']}",
        schema.QUESTION: entry["Text"],
        schema.CHOICES: choices,
        schema.ANSWER: _answer_letter(entry["Ground truth"], choices, where),
        schema.CATEGORY: category or "unknown",
        schema.IMAGE_PATH: _resolve(str(entry["Image"]), image_root),
    }
    try:
      yield schema.normalize_sample(record)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None


def _image_ext(data: bytes) -> str:
  if data.startswith(b"\x89PNG"):
    return ".png"
  if data.startswith(b"\xff\xd8"):
    return ".jpg"
  return ".img"


def write_jsonl(
    samples: Iterable[schema.Sample], path: str | os.PathLike, image_dir: str = "images"
) -> int:
  """Writes samples as JSONL; image bytes go to `<jsonl folder>/<image_dir>/`. Returns the count.

  Samples that already hold an `image_path` keep it (made relative to the JSONL folder when it
  lies below it).
  """
  path = os.fspath(path)
  base = os.path.dirname(os.path.abspath(path))
  os.makedirs(os.path.join(base, image_dir), exist_ok=True)
  count = 0
  with open(path, "w", encoding="utf-8") as f:
    for sample in samples:
      record: dict[str, Any] = {k: v for k, v in sample.items() if k != schema.IMAGE}
      if schema.IMAGE in sample:
        data = sample[schema.IMAGE]
        fname = re.sub(r"[^A-Za-z0-9._-]", "_", sample[schema.ID]) + _image_ext(data)
        with open(os.path.join(base, image_dir, fname), "wb") as img_f:
          img_f.write(data)
        record[schema.IMAGE_PATH] = os.path.join(image_dir, fname)
      elif os.path.isabs(record[schema.IMAGE_PATH]):
        rel = os.path.relpath(record[schema.IMAGE_PATH], base)
        if not rel.startswith(".."):
          record[schema.IMAGE_PATH] = rel
      f.write(json.dumps(record) + "\n")
      count += 1
  return count

