"""Minimal zero-copy safetensors reader/writer on numpy (with bfloat16 via ml_dtypes).

The `safetensors` package's numpy path cannot represent bfloat16, and its flax path materialises every
tensor on the default device. The format is a little-endian u64 header length, a JSON header
{name: {dtype, shape, data_offsets}} and raw bytes, so a memory map gives exact, streaming access.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Iterator, Mapping, Sequence

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
    if not isinstance(header, dict):
      raise SafetensorsError(f"{self.path}: corrupt header (not a JSON object)")
    self.metadata = header.pop("__metadata__", None) or {}
    for key, info in header.items():
      _check_entry(self.path, key, info)
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

  def _locate(self, key: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
    info = self._header[key]
    if info["dtype"] not in DTYPES:
      raise SafetensorsError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(DTYPES[info["dtype"]])
    start, stop = info["data_offsets"]
    shape = tuple(info["shape"])
    if stop - start != int(np.prod(shape)) * dtype.itemsize:
      raise SafetensorsError(f"{self.path}: tensor {key!r} byte range does not match shape {shape}")
    return dtype, shape, self._data_start + start, self._data_start + stop

  def get(self, key: str) -> np.ndarray:
    """Zero-copy read-only view into the memory map (its pages count in RSS while mapped)."""
    dtype, shape, start, stop = self._locate(key)
    if stop == start:
      return np.zeros(shape, dtype)
    return self._mm[start:stop].view(dtype).reshape(shape)

  def read(self, key: str) -> np.ndarray:
    """A fresh writable copy read with pread: unlike `get`, nothing stays mapped, so streaming a whole
    checkpoint through `read` keeps the resident set at one tensor, not the whole file."""
    dtype, shape, start, stop = self._locate(key)
    out = np.empty(shape, dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(self.path, os.O_RDONLY)
    try:
      done = 0
      while done < stop - start:
        n = os.preadv(fd, [view[done:]], start + done)
        if n <= 0:
          raise SafetensorsError(f"{self.path}: truncated while reading tensor {key!r}")
        done += n
    finally:
      os.close(fd)
    return out


def open_dir(hf_dir: str | os.PathLike) -> dict[str, SafetensorsFile]:
  """Map every tensor name of an HF directory (single file or sharded with an index) to its file."""
  hf_dir = os.fspath(hf_dir)
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f"checkpoint directory {hf_dir!r} does not exist")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      if not isinstance(weight_map, dict):
        raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
      raise SafetensorsError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
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
  write_streaming(path, [(name, arr.dtype, arr.shape) for name, arr in items], items, metadata)

def _check_entry(path: str, key: str, info) -> None:
  """Reject header entries that would fail later with an obscure error."""
  ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
        and isinstance(info.get("shape"), list)
        and all(isinstance(d, int) and d >= 0 for d in info["shape"])
        and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
        and all(isinstance(o, int) for o in info["data_offsets"])
        and 0 <= info["data_offsets"][0] <= info["data_offsets"][1])
  if not ok:
    raise SafetensorsError(f"{path}: corrupt header entry for tensor {key!r}: {info!r}"[:300])


def header_bytes(specs: Sequence[tuple[str, np.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None) -> bytes:
  """Length prefix + JSON header for tensors (name, dtype, shape) laid out back to back in this order."""
  header, offset = {}, 0
  for name, dtype, shape in specs:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    header[name] = {"dtype": NAMES[dtype], "shape": [int(d) for d in shape],
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
  return struct.pack("<Q", len(raw)) + raw


def write_streaming(path: str | os.PathLike, specs: Sequence[tuple[str, np.dtype, Sequence[int]]],
                    arrays: Iterable[tuple[str, np.ndarray]], metadata: Mapping[str, str] | None = None,
                    on_write: Callable[[int], None] | None = None) -> None:
  """Write one safetensors file whose header is known up front, pulling (name, array) pairs one at a
  time, so only one tensor is in memory. Each pair must match the next spec (name, dtype, shape)."""
  it = iter(arrays)
  with open(path, "wb") as f:
    f.write(header_bytes(specs, metadata))
    for name, dtype, shape in specs:
      try:
        got_name, arr = next(it)
      except StopIteration:
        raise SafetensorsError(f"{path}: ran out of tensors before {name!r}") from None
      if (got_name, np.dtype(arr.dtype), tuple(arr.shape)) != (name, np.dtype(dtype), tuple(shape)):
        raise SafetensorsError(f"{path}: expected {name!r} {np.dtype(dtype)} {tuple(shape)}, got "
                               f"{got_name!r} {arr.dtype} {tuple(arr.shape)}")
      f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
      if on_write is not None:
        on_write(arr.nbytes)
