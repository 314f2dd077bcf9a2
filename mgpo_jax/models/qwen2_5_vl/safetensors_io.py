"""Minimal zero-copy safetensors reader/writer on numpy (with bfloat16 via ml_dtypes).

The `safetensors` package's numpy path cannot represent bfloat16, and its flax path materialises every
tensor on the default device. The format is a little-endian u64 header length, a JSON header
{name: {dtype, shape, data_offsets}} and raw bytes, so a memory map gives exact, streaming access.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  """A safetensors file is truncated, corrupt or inconsistent."""


class SafetensorsFile:
  """Random access to the tensors of one file, each a read-only view of a memory map."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise SafetensorsError(f"{self.path}: truncated (no header)")
      (n,) = struct.unpack("<Q", raw)
      if n > size - 8 or n > 100 << 20:
        raise SafetensorsError(f"{self.path}: header length {n} does not fit in a file of {size} bytes")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    self._header = header
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if self._data_start + end > size:
      raise SafetensorsError(
          f"{self.path}: truncated: tensors need {self._data_start + end} bytes, file has {size}")
    self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._data_start else None

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._header[key]["shape"])

  def dtype(self, key: str) -> np.dtype:
    return np.dtype(DTYPES[self._header[key]["dtype"]])

  def get(self, key: str) -> np.ndarray:
    info = self._header[key]
    if info["dtype"] not in DTYPES:
      raise SafetensorsError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(DTYPES[info["dtype"]])
    start, stop = info["data_offsets"]
    shape = tuple(info["shape"])
    if stop - start != int(np.prod(shape)) * dtype.itemsize:
      raise SafetensorsError(f"{self.path}: tensor {key!r} byte range does not match shape {shape}")
    if stop == start:
      return np.zeros(shape, dtype)
    buf = self._mm[self._data_start + start:self._data_start + stop]
    return buf.view(dtype).reshape(shape)


def open_dir(hf_dir: str | os.PathLike) -> dict[str, SafetensorsFile]:
  """Map every tensor name of an HF directory (single file or sharded with an index) to its file."""
  hf_dir = os.fspath(hf_dir)
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    weight_map = None
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {hf_dir!r}")
  opened = {}
  for name in files:
    path = os.path.join(hf_dir, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is listed in the index but missing")
    opened[name] = SafetensorsFile(path)
  out = {}
  for name, sf in opened.items():
    for key in sf.keys():
      if weight_map is not None and weight_map.get(key) != name:
        continue
      out[key] = sf
  if weight_map is not None:
    missing = [k for k in weight_map if k not in out]
    if missing:
      raise SafetensorsError(f"tensors {missing[:5]} listed in the index are not in their files")
  return out


def write_file(path: str | os.PathLike, tensors: Iterator[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
  """Write tensors (name, array) to one safetensors file; arrays are written one by one."""
  items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
  header, offset = {}, 0
  for name, arr in items:
    nbytes = arr.size * arr.dtype.itemsize
    header[name] = {"dtype": NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, arr in items:
      f.write(np.ascontiguousarray(arr).tobytes())
