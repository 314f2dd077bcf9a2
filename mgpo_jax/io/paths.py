"""Files on a local disk or an object store (gs://...), one set of helpers for the whole package.

Local paths go through `os`; remote ones (anything with "://") through `etils.epath`, which needs a
filesystem backend such as gcsfs (`launch/setup.sh` installs it). Checkpoints, metrics, event files,
rollout pages and evaluation results all write through these.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """gs://... and other object-store paths (read and written through etils.epath)."""
  return "://" in os.fspath(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def join_path(*parts: str) -> str:
  return "/".join(p.rstrip("/") for p in parts) if is_remote(parts[0]) else os.path.join(*parts)


def write_file(path: str, data: bytes) -> None:
  if is_remote(path):
    epath.Path(path).write_bytes(data)
  else:
    with open(path, "wb") as fh:
      fh.write(data)


def atomic_write(path: str, data: bytes) -> None:
  """Writes `data` so that a reader never sees a half-written file (a killed writer leaves the old one)."""
  if is_remote(path):  # an object is replaced whole: already atomic
    epath.Path(path).write_bytes(data)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as fh:
    fh.write(data)
  os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
  atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_bytes(path: str) -> bytes | None:
  """The file's content, or None if it does not exist."""
  if is_remote(path):
    p = epath.Path(path)
    return p.read_bytes() if p.exists() else None
  try:
    with open(path, "rb") as fh:
      return fh.read()
  except FileNotFoundError:
    return None


def list_dir(path: str) -> list[str]:
  if is_remote(path):
    return [p.name for p in epath.Path(path).iterdir()]
  return os.listdir(path)


class AppendFile:
  """A file written by appending, locally or on an object store (gs://...).

  Object stores cannot append; like TensorFlow's GCS writer, the remote case keeps the content and
  rewrites the whole object on every flush (metrics and event files stay small).
  """

  def __init__(self, path: str, initial: bytes | None = None):
    self.path = path
    self._remote = is_remote(path)
    self._content = bytearray()
    if self._remote:
      self._epath = epath.Path(path)
      if initial is not None:
        self._content += initial
        self._epath.write_bytes(bytes(self._content))
    else:
      if initial is not None:
        atomic_write(path, initial)
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

