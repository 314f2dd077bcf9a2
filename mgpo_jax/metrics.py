"""Training metrics: `metrics.jsonl`, TensorBoard event files and a console progress bar.

`MetricsWriter(workdir)` writes, on the primary process only:

  <workdir>/metrics.jsonl          one JSON object per step: {"step": 12, "reward": 0.5, ...}
  <workdir>/tensorboard/events.*   scalars, images and texts for TensorBoard
  stderr                           a tqdm bar with the key numbers

Resuming: `MetricsWriter(workdir, start_step=k)` (k = the restored checkpoint's step, 0 for a fresh
run) drops the lines of metrics.jsonl with step > k, which a crashed run logged after its last
checkpoint and the resumed run will log again. Its new event file starts with a SessionLog START
event at step k + 1, TensorBoard's own signal to discard the older points from step k + 1 on.

Event files without TensorFlow: neither TensorFlow nor `tensorboard` (whose protobuf classes a
writer would use) is a dependency, and `flax.metrics.tensorboard` needs TensorFlow. The format is
small and stable, so this module writes it directly: TFRecord framing (length, masked CRC-32C of the
length, data, masked CRC-32C of the data) around `Event` protobufs, whose few fields are encoded by
hand with their numbers from tensorflow/core/util/event.proto and framework/summary.proto:

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
import json
import logging
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
import tqdm

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Shown in the progress bar when present (a metric matches by name or by its last "/" part).
PROGRESS_KEYS = ("rollout/reward_mean", "rollout/valid_box_rate", "train/loss", "train/kl", "train/entropy", "eval/accuracy")

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
# Files that only grow.
# ------------------------------------------------------------------------------------------------


def _is_remote(path: str) -> bool:
  return "://" in path


class _AppendFile:
  """A file written by appending, locally or on an object store (gs://...).

  Object stores cannot append; like TensorFlow's GCS writer, the remote case keeps the content and
  rewrites the whole object on every flush (metrics and event files stay small).
  """

  def __init__(self, path: str, initial: bytes | None = None):
    self.path = path
    self._remote = _is_remote(path)
    self._content = bytearray()
    if self._remote:
      from etils import epath  # pylint: disable=g-import-not-at-top  # Only for remote paths.

      self._epath = epath.Path(path)
      if initial is not None:
        self._content += initial
        self._epath.write_bytes(bytes(self._content))
    else:
      if initial is not None:
        _atomic_write(path, initial)
      self._fh = open(path, "ab")  # pylint: disable=consider-using-with

  def append(self, data: bytes) -> None:
    if self._remote:
      self._content += data
      self._epath.write_bytes(bytes(self._content))
    else:
      self._fh.write(data)
      self._fh.flush()

  def close(self) -> None:
    if not self._remote:
      self._fh.close()


def _atomic_write(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as fh:
    fh.write(data)
  os.replace(tmp, path)


def _read_bytes(path: str) -> bytes | None:
  if _is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top

    p = epath.Path(path)
    return p.read_bytes() if p.exists() else None
  try:
    with open(path, "rb") as fh:
      return fh.read()
  except FileNotFoundError:
    return None


# Small file helpers shared with `visualize` (local paths via os, gs://... via etils.epath, which
# needs a filesystem backend such as gcsfs for remote paths).


def makedirs(path: str) -> None:
  if _is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top

    epath.Path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def join_path(*parts: str) -> str:
  return "/".join(p.rstrip("/") for p in parts) if _is_remote(parts[0]) else os.path.join(*parts)


def write_file(path: str, data: bytes) -> None:
  if _is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top

    epath.Path(path).write_bytes(data)
  else:
    with open(path, "wb") as fh:
      fh.write(data)


def list_dir(path: str) -> list[str]:
  if _is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top

    return [p.name for p in epath.Path(path).iterdir()]
  return os.listdir(path)


# ------------------------------------------------------------------------------------------------
# Event files.
# ------------------------------------------------------------------------------------------------

_file_counter = 0


class EventFileWriter:
  """Appends TensorBoard events (scalars, PNG images, texts) to a new event file in `logdir`."""

  def __init__(self, logdir: str | os.PathLike):
    global _file_counter
    logdir = os.fspath(logdir)
    makedirs(logdir)
    _file_counter += 1
    # TensorBoard reads files whose name contains "tfevents", in name order: the timestamp first.
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{_file_counter}")
    self.path = join_path(logdir, name)
    self._file = _AppendFile(self.path, initial=b"")
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


# ------------------------------------------------------------------------------------------------
# The writer the training loop uses.
# ------------------------------------------------------------------------------------------------


def _as_scalar(key: str, value: Any) -> int | float:
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"metric {key!r} must be a scalar, got shape {arr.shape}")
  v = arr.reshape(()).item()
  if isinstance(v, bool):
    return int(v)
  if isinstance(v, (int, float)):
    return v
  raise ValueError(f"metric {key!r} must be a number, got {value!r}")


def _json_value(v: int | float) -> int | float | None:
  # Strict JSON has no NaN/inf: they become null here (TensorBoard still gets the real value).
  return v if isinstance(v, int) or math.isfinite(v) else None


def _parse_lines(data: bytes, where: str) -> list[tuple[int, bytes]]:
  """(step, line) of every complete, well-formed line; a torn last line is dropped."""
  out = []
  lines = data.split(b"\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      if i == len(lines) - 1:
        logger.warning("%s: dropping a torn last line (the run was killed while writing it)", where)
        continue
      raise ValueError(f"{where}:{i + 1}: not a metrics line: {line[:80]!r}") from None
    out.append((step, line))
  return out


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The entries of <workdir>/metrics.jsonl, in file order."""
  path = join_path(os.fspath(workdir), METRICS_FILE)
  data = _read_bytes(path)
  return [] if data is None else [json.loads(line) for _, line in _parse_lines(data, path)]


class MetricsWriter:
  """Per-step scalars to metrics.jsonl + TensorBoard + a progress bar; images/texts to TensorBoard.

  Only the primary process writes anything; elsewhere every method is a no-op, so the training
  loop calls it unconditionally.

  Args:
    workdir: the run's folder (local or gs://...).
    is_primary: whether this process writes; default `jax.process_index() == 0`.
    start_step: the step the run starts from (the restored checkpoint's, 0 for a fresh run);
      entries of an earlier, interrupted run with a larger step are dropped.
    total_steps: length of the progress bar (None: no bar).
    tensorboard: also write TensorBoard event files.
    progress_keys: metrics shown in the progress bar (by full name or last "/" part).
    progress_stream: where the bar goes (default stderr).
  """

  def __init__(self, workdir: str | os.PathLike, *, is_primary: bool | None = None,
               start_step: int = 0, total_steps: int | None = None, tensorboard: bool = True,
               progress_keys: Sequence[str] = PROGRESS_KEYS, progress_stream=None):
    if is_primary is None:
      import jax  # pylint: disable=g-import-not-at-top  # Only for the default.

      is_primary = jax.process_index() == 0
    self.workdir = os.fspath(workdir)
    self.is_primary = bool(is_primary)
    self.start_step = int(start_step)
    self._progress_keys = tuple(progress_keys)
    self._last_step: int | None = None
    self._jsonl = self._events = self._bar = None
    if not self.is_primary:
      return
    makedirs(self.workdir)
    path = join_path(self.workdir, METRICS_FILE)
    old = _read_bytes(path)
    kept = b""
    if old is not None:
      lines = _parse_lines(old, path)
      keep = [(s, line) for s, line in lines if s <= self.start_step]
      if len(keep) < len(lines):
        logger.info("%s: dropping %d entries after the resumed step %d", path,
                    len(lines) - len(keep), self.start_step)
      kept = b"".join(line + b"\n" for _, line in keep)
      self._last_step = max((s for s, _ in keep), default=None)
    self._jsonl = _AppendFile(path, initial=kept if old is not None else None)
    if tensorboard:
      self._events = EventFileWriter(join_path(self.workdir, TENSORBOARD_DIR))
      self._events.session_start(self.start_step + 1)
    if total_steps is not None:
      self._bar = tqdm.tqdm(total=total_steps, initial=self.start_step, unit="step",
                            dynamic_ncols=True, file=progress_stream or sys.stderr)

  @property
  def last_step(self) -> int | None:
    """The largest step in metrics.jsonl (None if empty)."""
    return self._last_step

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends one line {"step": step, **scalars}; call once per step, with increasing steps."""
    if not self.is_primary:
      return
    if self._jsonl is None:
      raise ValueError("MetricsWriter is closed")
    step = int(step)
    if self._last_step is not None and step <= self._last_step:
      raise ValueError(f"metrics for step {step} after step {self._last_step}: steps must "
                       "increase (pass all scalars of a step in one call)")
    values = {}
    for key, value in scalars.items():
      if not isinstance(key, str) or key == "step":
        raise ValueError(f"metric names must be strings other than 'step', got {key!r}")
      values[key] = _as_scalar(key, value)
    line = json.dumps({"step": step, **{k: _json_value(v) for k, v in values.items()}},
                      allow_nan=False)
    self._jsonl.append(line.encode("utf-8") + b"\n")
    self._last_step = step
    if self._events is not None:
      self._events.scalars(step, values)
    if self._bar is not None:
      self._bar.update(max(0, step - self._bar.n))
      shown = {self._short(k): f"{v:.4g}" for k, v in values.items() if self._shows(k)}
      if shown:
        self._bar.set_postfix(shown, refresh=True)

  def _shows(self, key: str) -> bool:
    return key in self._progress_keys or key.rsplit("/", 1)[-1] in self._progress_keys

  @staticmethod
  def _short(key: str) -> str:
    return key.rsplit("/", 1)[-1]

  def write_images(self, step: int, images: Mapping[str, Image.Image | np.ndarray]) -> None:
    """PIL images or uint8 / [0, 1]-float arrays [H, W(, C)] into TensorBoard."""
    if self.is_primary and self._events is not None:
      self._events.images(int(step), images)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Markdown texts into TensorBoard's text tab."""
    if self.is_primary and self._events is not None:
      self._events.texts(int(step), texts)

  def close(self) -> None:
    for closable in (self._jsonl, self._events, self._bar):
      if closable is not None:
        closable.close()
    self._jsonl = self._events = self._bar = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
