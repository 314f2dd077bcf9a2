"""What the programs (`main`, `evaluate`, `repro`) share on the command line.

- `--config` takes a packaged config by name (`tpu_v5`), the old repository path of one
  (`configs/tpu_v5.py`, which works from any folder), or any experiment file (`/my/exp.py`).
- `--config.<section>.<field>=value` overrides are read here rather than by ml_collections' flag, so that
  a misspelt field does not stop the parse: every unknown field (with its "did you mean"), every value
  that does not parse and every problem `config.validate` finds are reported together.
- `run(main, prog)` is `absl.app.run` with one-line errors: a problem of the user's input (config,
  checkpoint, restart) prints `prog: error: ...` (a config's problems one per line) and exits with
  status 2, without a traceback unless `MGPO_TRACEBACK=1` or `--verbosity>=1` asks for one.
"""

from __future__ import annotations

import ast
import difflib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging as absl_logging
import ml_collections

from mgpo_jax.config.fields import ConfigError
from mgpo_jax.config.files import load_config_file, packaged_configs, resolve_config_path
from mgpo_jax.io.checkpoint import CheckpointError
from mgpo_jax.models.qwen2_5_vl.config import UnsupportedConfigError
from mgpo_jax.models.qwen2_5_vl.params import CheckpointMismatchError
from mgpo_jax.models.qwen2_5_vl.safetensors_io import SafetensorsError

_PREFIX = "--config."
TRACEBACK_ENV = "MGPO_TRACEBACK"

# Problems with what the user gave (flags, configs, checkpoints, a workdir): one line, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, CheckpointError, CheckpointMismatchError, UnsupportedConfigError, SafetensorsError)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(argv without the `--config.x.y=v` overrides, the overrides as (dotted field, raw value))."""
  rest, overrides = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    a = args[i]
    if a.startswith(_PREFIX):
      body = a[len(_PREFIX):]
      if "=" in body:
        key, value = body.split("=", 1)
      elif i + 1 < len(args) and not args[i + 1].startswith("--"):
        key, value = body, args[i + 1]
        i += 1
      else:
        key, value = body, "true"  # absl's boolean form: --config.rollout.single_turn
      overrides.append((key, value))
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def _leaf_paths(node: Any, prefix: str = "") -> list[str]:
  out = []
  for k in node.keys():
    v = node[k]
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out += _leaf_paths(v, f"{prefix}{k}.")
  return out


def _parse_value(raw: str, tp: type, current: Any) -> Any:
  """`raw` as the field's type, the way a user writes it on a command line."""
  if tp is bool:
    low = raw.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"must be True or False, got {raw!r}")
  if tp is int:
    try:
      return int(raw)
    except ValueError:
      raise ValueError(f"must be an integer, got {raw!r}") from None
  if tp is float:
    try:
      return float(raw)
    except ValueError:
      raise ValueError(f"must be a number, got {raw!r}") from None
  if tp is str:
    return raw
  if tp in (tuple, list) or isinstance(current, (tuple, list)):
    try:
      v = ast.literal_eval(raw) if raw.strip() else ()
    except (ValueError, SyntaxError):
      v = tuple(x.strip() for x in raw.split(",") if x.strip())  # a,b,c: strings
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)
  try:  # a placeholder of an unknown type (e.g. a field whose default is None)
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> list[str]:
  """Sets each override on `config`; returns one problem per override that cannot be applied."""
  problems = []
  known = _leaf_paths(config)
  for key, raw in overrides:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part] if isinstance(node, ml_collections.ConfigDict) and part in node else None
      if node is None:
        break
    if node is None or not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
      hint = f"; did you mean {close[0]}?" if close else ""
      problems.append(f"{key}: unknown field{hint}")
      continue
    if isinstance(node[leaf], ml_collections.ConfigDict):
      problems.append(f"{key}: is a section; set one of its fields ({key}.<field>=...)")
      continue
    try:
      value = _parse_value(raw, node.get_type(leaf), node[leaf])
      node[leaf] = value
    except (ValueError, TypeError) as e:
      problems.append(f"{key}: {' '.join(str(e).split())}")
  return problems


class ConfigFlag:
  """`--config` (a name or a path) plus the overrides `run` collected from the command line."""

  def __init__(self, default: str, help_text: str):
    self._flag = flags.DEFINE_string("config", default, help_text + " A packaged config by name ("
                                     + ", ".join(packaged_configs()) + ") or an experiment file; "
                                     "--config.<section>.<field>=value overrides a field.")
    self.overrides: list[tuple[str, str]] = []

  @property
  def value(self) -> str:
    """The `--config` argument as given (a name or a path)."""
    return self._flag.value

  def load(self, validate: Callable[[Any], None] | None = None) -> ml_collections.ConfigDict:
    """The config with the overrides applied, locked; raises one ConfigError listing every problem
    (unknown fields, unparsable values, and what `validate` finds on the rest)."""
    config = load_config_file(resolve_config_path(self._flag.value))
    problems = apply_overrides(config, self.overrides)
    if validate is not None:
      try:
        validate(config)
      except ConfigError as e:
        problems += [line[4:] for line in str(e).splitlines() if line.startswith("  - ")] or [str(e)]
    if problems:
      problems = list(dict.fromkeys(problems))
      lines = "\n".join(f"  - {p}" for p in problems)
      raise ConfigError(f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")
    config.lock()
    return config


_CONFIG_FLAGS: list[ConfigFlag] = []


def define_config_flag(default: str, help_text: str = "Experiment config.") -> ConfigFlag:
  flag = ConfigFlag(default, help_text)
  _CONFIG_FLAGS.append(flag)
  return flag


def _wants_traceback() -> bool:
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or absl_logging.get_verbosity() >= 1


def _quiet_unraisable(u) -> None:
  # After a failed Orbax read, TensorStore completes the other pending reads into Orbax's already closed
  # asyncio loop; Python would print each as a traceback under our one-line error. Nothing is lost.
  if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
    return
  sys.__unraisablehook__(u)


def error_text(prog: str, e: BaseException) -> str:
  msg = str(e).strip() or type(e).__name__
  if "\n" not in msg:
    msg = " ".join(msg.split())
  return f"{prog}: error: {msg}"


def run(main: Callable[[Sequence[str]], Any], prog: str) -> None:
  """`absl.app.run(main)` with the programs' command line (see the module's docstring)."""

  def parse(argv: Sequence[str]) -> list[str]:
    rest, overrides = split_overrides(argv)
    for f in _CONFIG_FLAGS:
      f.overrides = overrides
    try:
      return flags.FLAGS(rest)
    except flags.Error as e:
      sys.stderr.write(f"{prog}: error: {' '.join(str(e).split())} (see --help)\n")
      sys.exit(2)

  def guarded(argv: Sequence[str]) -> Any:
    try:
      return main(argv)
    except USER_ERRORS as e:
      if _wants_traceback():
        traceback.print_exc()
      sys.stdout.flush()
      sys.stderr.write(error_text(prog, e) + "\n")
      sys.exit(2)

  sys.unraisablehook = _quiet_unraisable
  app.run(guarded, flags_parser=parse)
