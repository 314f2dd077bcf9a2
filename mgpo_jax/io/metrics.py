"""Training metrics: `metrics.jsonl`, TensorBoard event files and a console progress bar.

`MetricsWriter(workdir)` writes, on the primary process only:

  <workdir>/metrics.jsonl          one JSON object per step: {"step": 12, "reward": 0.5, ...}
  <workdir>/tensorboard/events.*   scalars, images and texts for TensorBoard (`io.events`)
  stderr                           a tqdm bar with the key numbers on a terminal; elsewhere (a log file,
                                   a terminal of unknown width) one log line per step instead

While the bar is shown, log records (warnings of skipped images, say) first clear it, so that they
print on lines of their own and the bar is redrawn below them at the next step.

Resuming: `MetricsWriter(workdir, start_step=k)` (k = the restored checkpoint's step, 0 for a fresh
run) drops the lines of metrics.jsonl with step > k, which a crashed run logged after its last
checkpoint and the resumed run will log again. Its new event file starts with a SessionLog START
event at step k + 1, TensorBoard's own signal to discard the older points from step k + 1 on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from PIL import Image
import tqdm

from mgpo_jax.io import events as events_lib
from mgpo_jax.io import paths

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Shown in the progress bar when present (a metric matches by name or by its last "/" part).
PROGRESS_KEYS = ("rollout/reward_mean", "rollout/valid_box_rate", "train/loss", "train/kl", "train/entropy", "eval/accuracy")


class _ClearBar(logging.Filter):
  """Clears the bar before a handler prints a record (a filter runs just before the handler emits)."""

  def __init__(self, bar):
    super().__init__()
    self._bar = bar

  def filter(self, record: logging.LogRecord) -> bool:
    self._bar.clear()
    return True


def _terminal_columns(stream) -> int:
  """Width of the terminal `stream` is, 0 when it is not a terminal or its width is unknown."""
  try:
    if not stream.isatty():
      return 0
    return os.get_terminal_size(stream.fileno()).columns
  except (AttributeError, OSError, ValueError):
    return shutil.get_terminal_size((0, 0)).columns if getattr(stream, "isatty", lambda: False)() else 0


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
  path = paths.join_path(os.fspath(workdir), METRICS_FILE)
  data = paths.read_bytes(path)
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
      is_primary = jax.process_index() == 0
    self.workdir = os.fspath(workdir)
    self.is_primary = bool(is_primary)
    self.start_step = int(start_step)
    self._progress_keys = tuple(progress_keys)
    self._last_step: int | None = None
    self._jsonl = self._events = self._bar = None
    self._total_steps = total_steps
    self._t_last = time.perf_counter()
    self._log_lines = False
    self._filtered: list[logging.Handler] = []
    if not self.is_primary:
      return
    paths.makedirs(self.workdir)
    path = paths.join_path(self.workdir, METRICS_FILE)
    old = paths.read_bytes(path)
    kept = b""
    if old is not None:
      lines = _parse_lines(old, path)
      keep = [(s, line) for s, line in lines if s <= self.start_step]
      if len(keep) < len(lines):
        logger.info("%s: dropping %d entries after the resumed step %d", path,
                    len(lines) - len(keep), self.start_step)
      kept = b"".join(line + b"\n" for _, line in keep)
      self._last_step = max((s for s, _ in keep), default=None)
    self._jsonl = paths.AppendFile(path, initial=kept if old is not None else None)
    if tensorboard:
      self._events = events_lib.EventFileWriter(paths.join_path(self.workdir, TENSORBOARD_DIR))
      self._events.session_start(self.start_step + 1)
    if total_steps is not None:
      stream = progress_stream or sys.stderr
      columns = _terminal_columns(stream)
      if columns > 0 or progress_stream is not None:
        # A fixed width when the terminal does not say its own (tqdm would print nothing).
        self._bar = tqdm.tqdm(total=total_steps, initial=self.start_step, unit="step",
                              dynamic_ncols=columns > 0, ncols=None if columns > 0 else 100, file=stream)
        self._filter = _ClearBar(self._bar)
        self._filtered = list(logging.getLogger().handlers)
        for h in self._filtered:
          h.addFilter(self._filter)
      else:  # a log file or a pipe: \r-redrawn bars would fill it; one line per step instead
        self._log_lines = True

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
    shown = {self._short(k): f"{v:.4g}" for k, v in values.items() if self._shows(k)}
    if self._bar is not None:
      self._bar.update(max(0, step - self._bar.n))
      if shown:
        self._bar.set_postfix(shown, refresh=True)
    elif self._log_lines:
      now = time.perf_counter()
      numbers = ", ".join(f"{k} {v}" for k, v in shown.items())
      logger.info("step %d/%d (%.1f s)%s", step, self._total_steps, now - self._t_last,
                  f": {numbers}" if numbers else "")
      self._t_last = now

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
    for h in self._filtered:
      h.removeFilter(self._filter)
    self._filtered = []
    for closable in (self._jsonl, self._events, self._bar):
      if closable is not None:
        closable.close()
    self._jsonl = self._events = self._bar = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
