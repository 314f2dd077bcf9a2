"""TensorBoard event files without TensorFlow: the writer and a reader.

Neither TensorFlow nor `tensorboard` (whose protobuf classes a writer would use) is a dependency, and
`flax.metrics.tensorboard` needs TensorFlow. The format is small and stable, so this module writes it
directly: TFRecord framing (length, masked CRC-32C of the length, data, masked CRC-32C of the data)
around `Event` protobufs, whose few fields are encoded by hand with their numbers from
tensorflow/core/util/event.proto and framework/summary.proto:

  Event    1 wall_time (double)  2 step (int64)  3 file_version (string)  5 summary  7 session_log
  Summary  1 value (repeated)
  Value    1 tag  2 simple_value (float)  4 image  8 tensor  9 metadata
  Image    1 height  2 width  3 colorspace  4 encoded_image_string
  SessionLog 1 status (START = 1)
  SummaryMetadata 1 plugin_data {1 plugin_name}   TensorProto 1 dtype (DT_STRING = 7) 8 string_val

`read_events` decodes these files again (used by the tests, handy for tools).
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
import struct
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from mgpo_jax.io import paths

# ------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli) and TFRecord framing.
# ------------------------------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
  poly = 0x82F63B78  # Reversed Castagnoli polynomial.
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table.append(c)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (pure Python; records are small, images a few hundred kB at most)."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 bits and add a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of the length, data, masked CRC of the data."""
  length = struct.pack("<Q", len(data))
  return b"".join((length, struct.pack("<I", masked_crc32c(length)), data,
                   struct.pack("<I", masked_crc32c(data))))


def read_records(data: bytes, where: str = "<bytes>") -> Iterator[bytes]:
  """The records of a TFRecord byte string; CRCs are checked, a torn last record is ignored."""
  pos = 0
  while pos < len(data):
    if pos + 12 > len(data):
      return  # Torn header at the end (a writer killed mid-record).
    length_bytes = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", length_bytes)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    if length_crc != masked_crc32c(length_bytes):
      raise ValueError(f"{where}: corrupt record length at byte {pos}")
    end = pos + 12 + length + 4
    if end > len(data):
      return  # Torn record at the end.
    payload = data[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", data[end - 4:end])
    if data_crc != masked_crc32c(payload):
      raise ValueError(f"{where}: corrupt record data at byte {pos}")
    yield payload
    pos = end


# ------------------------------------------------------------------------------------------------
# Protobuf wire format (the few fields of Event / Summary that we write).
# ------------------------------------------------------------------------------------------------

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
  if n < 0:
    n += 1 << 64  # int64 two's complement, as protobuf encodes negative int64.
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _key(field: int, wire: int) -> bytes:
  return _varint(field << 3 | wire)


def _pb_int(field: int, n: int) -> bytes:
  return _key(field, _VARINT) + _varint(int(n))


def _pb_double(field: int, x: float) -> bytes:
  return _key(field, _FIXED64) + struct.pack("<d", x)


def _pb_float(field: int, x: float) -> bytes:
  return _key(field, _FIXED32) + struct.pack("<f", x)


def _pb_bytes(field: int, payload: bytes) -> bytes:
  return _key(field, _LEN) + _varint(len(payload)) + payload


def _pb_str(field: int, s: str) -> bytes:
  return _pb_bytes(field, s.encode("utf-8"))


_DT_STRING = 7
_SESSION_START = 1
FILE_VERSION = "brain.Event:2"


def _event(step: int, wall_time: float, what: bytes) -> bytes:
  return _pb_double(1, wall_time) + _pb_int(2, step) + what


def _summary(values: Sequence[bytes]) -> bytes:
  return _pb_bytes(5, b"".join(_pb_bytes(1, v) for v in values))


def _scalar_value(tag: str, x: float) -> bytes:
  return _pb_str(1, tag) + _pb_float(2, x)


def _image_value(tag: str, png: bytes, height: int, width: int, channels: int) -> bytes:
  image = _pb_int(1, height) + _pb_int(2, width) + _pb_int(3, channels) + _pb_bytes(4, png)
  return _pb_str(1, tag) + _pb_bytes(4, image)


def _text_value(tag: str, text: str) -> bytes:
  # The text plugin reads a DT_STRING tensor (scalar shape = an empty TensorShapeProto).
  metadata = _pb_bytes(1, _pb_str(1, "text"))
  tensor = _pb_int(1, _DT_STRING) + _pb_bytes(2, b"") + _pb_bytes(8, text.encode("utf-8"))
  return _pb_str(1, tag) + _pb_bytes(9, metadata) + _pb_bytes(8, tensor)


def _parse_fields(buf: bytes) -> dict[int, list[Any]]:
  """Field number -> values (ints for varints, bytes for the rest) of one protobuf message."""
  fields: dict[int, list[Any]] = {}
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == _VARINT:
      value, pos = _read_varint(buf, pos)
    elif wire == _FIXED64:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == _FIXED32:
      value, pos = buf[pos:pos + 4], pos + 4
    elif wire == _LEN:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    fields.setdefault(field, []).append(value)
  return fields


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  n = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError("truncated protobuf varint")
    b = buf[pos]
    pos += 1
    n |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return n, pos


@dataclasses.dataclass
class Event:
  """One decoded event (only the kinds this module writes)."""

  step: int
  wall_time: float
  file_version: str | None = None
  session_start: bool = False
  scalars: dict[str, float] = dataclasses.field(default_factory=dict)
  images: dict[str, tuple[int, int, bytes]] = dataclasses.field(default_factory=dict)  # h, w, png
  texts: dict[str, str] = dataclasses.field(default_factory=dict)


def _decode_event(buf: bytes) -> Event:
  f = _parse_fields(buf)
  step = f.get(2, [0])[-1]
  if step >= 1 << 63:
    step -= 1 << 64
  ev = Event(step=step, wall_time=struct.unpack("<d", f[1][-1])[0] if 1 in f else 0.0)
  if 3 in f:
    ev.file_version = f[3][-1].decode("utf-8")
  if 7 in f:
    ev.session_start = _parse_fields(f[7][-1]).get(1, [0])[-1] == _SESSION_START
  for summary in f.get(5, []):
    for value in _parse_fields(summary).get(1, []):
      v = _parse_fields(value)
      tag = v[1][-1].decode("utf-8")
      if 2 in v:
        ev.scalars[tag] = struct.unpack("<f", v[2][-1])[0]
      if 4 in v:
        img = _parse_fields(v[4][-1])
        ev.images[tag] = (img[1][-1], img[2][-1], img[4][-1])
      if 8 in v:
        ev.texts[tag] = b"".join(_parse_fields(v[8][-1]).get(8, [])).decode("utf-8")
  return ev


def read_events(path: str | os.PathLike) -> list[Event]:
  """The events of one event file, or of every event file in a folder (in file-name order)."""
  path = os.fspath(path)
  files = [path]
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if "tfevents" in f)
  events = []
  for name in files:
    with open(name, "rb") as fh:
      events.extend(_decode_event(r) for r in read_records(fh.read(), name))
  return events


# ------------------------------------------------------------------------------------------------
# Event files.
# ------------------------------------------------------------------------------------------------

_file_counter = 0


class EventFileWriter:
  """Appends TensorBoard events (scalars, PNG images, texts) to a new event file in `logdir`."""

  def __init__(self, logdir: str | os.PathLike):
    global _file_counter
    logdir = os.fspath(logdir)
    paths.makedirs(logdir)
    _file_counter += 1
    # TensorBoard reads files whose name contains "tfevents", in name order: the timestamp first.
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{_file_counter}")
    self.path = paths.join_path(logdir, name)
    self._file = paths.AppendFile(self.path, initial=b"")
    self._write(0, _pb_str(3, FILE_VERSION))

  def _write(self, step: int, what: bytes) -> None:
    self._file.append(tfrecord(_event(step, time.time(), what)))

  def session_start(self, step: int) -> None:
    """Tells TensorBoard that a run (re)starts at `step`: older points from `step` on are dropped."""
    self._write(step, _pb_bytes(7, _pb_int(1, _SESSION_START)))

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if scalars:
      self._write(step, _summary([_scalar_value(k, float(v)) for k, v in scalars.items()]))

  def images(self, step: int, images: Mapping[str, Image.Image | np.ndarray]) -> None:
    values = []
    for tag, image in images.items():
      img = _as_pil(image, tag)
      buf = io.BytesIO()
      img.save(buf, format="PNG")
      values.append(_image_value(tag, buf.getvalue(), img.height, img.width, len(img.getbands())))
    if values:
      self._write(step, _summary(values))

  def texts(self, step: int, texts: Mapping[str, str]) -> None:
    if texts:
      self._write(step, _summary([_text_value(k, str(v)) for k, v in texts.items()]))

  def close(self) -> None:
    self._file.close()


def _as_pil(image: Image.Image | np.ndarray, tag: str) -> Image.Image:
  if isinstance(image, Image.Image):
    return image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")
  arr = np.asarray(image)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
    raise ValueError(f"image {tag!r}: need [H, W], [H, W, 1|3|4] or a PIL image, got {arr.shape}")
  if arr.dtype != np.uint8:
    if not np.issubdtype(arr.dtype, np.floating):
      raise ValueError(f"image {tag!r}: need uint8 or float in [0, 1], got {arr.dtype}")
    arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  return Image.fromarray(arr)
