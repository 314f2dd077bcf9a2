"""Readers that turn local datasets into the common sample schema (`schema.Sample`).

Readers never open images: they yield absolute `image_path`s (or encoded bytes for the synthetic
source), and the input pipeline decodes, guards and — if need be — skips them. Every reader is
registered by `SourceKind` in `READERS`, which the TFDS builder uses to pick one by name.

Formats
-------
JSONL (`SourceKind.JSONL`): one sample per line in the schema of `schema.py`, with `image_path`
relative to the JSONL file's folder (absolute paths are kept). `write_jsonl` writes this format.

The released benchmark layouts and the MGPO authors' parquet (`SourceKind.VSTAR`, `MME_REALWORLD`,
`HRBENCH`, `MGPO_PARQUET`) are read by `benchmarks` (formats and download commands there).
"""

from __future__ import annotations

import enum
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator

from mgpo_jax.data import benchmarks
from mgpo_jax.data import scenes
from mgpo_jax.data import schema
from mgpo_jax.data import synthetic


class SourceKind(enum.StrEnum):
  JSONL = "jsonl"
  SYNTHETIC = "synthetic"
  SCENES = "scenes"
  VSTAR = "vstar"
  MME_REALWORLD = "mme_realworld"
  HRBENCH = "hrbench"
  MGPO_PARQUET = "mgpo_parquet"


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


# The released benchmark layouts (see `benchmarks`): bad rows are logged and skipped, not raised.
read_vstar = register_reader(SourceKind.VSTAR)(benchmarks.read_vstar)
read_mme_realworld = register_reader(SourceKind.MME_REALWORLD)(benchmarks.read_mme_realworld)
read_hrbench = register_reader(SourceKind.HRBENCH)(benchmarks.read_hrbench)
read_mgpo_parquet = register_reader(SourceKind.MGPO_PARQUET)(benchmarks.read_mgpo_parquet)


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

