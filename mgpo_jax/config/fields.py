"""How a config field is described once, and what is generated from that description.

A config section is a frozen dataclass (`sections.py`); each field's annotation is its type, its default
the paper's value, and `field(...)` adds what a type cannot say: a range, the known names, or a check of
its own. From that one description come

  to_config_dict(section)    the `ml_collections.ConfigDict` that configs/*.py start from (locked by them, so
                             a misspelt field or a value of the wrong type fails at once, with a "did you mean")
  check_fields(chk, ...)     the checker of every field (type, range, choices), which `check.validate` runs
  from_config(cls, node)     the typed section of a ConfigDict (or of a section) once it has passed

so a field cannot be added, renamed or re-typed in one place and forgotten in another.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, Callable, Iterable, Mapping

import ml_collections
from ml_collections import config_dict

MISSING = object()  # a field that is absent or failed its check


class ConfigError(ValueError):
  """The config cannot run; the message lists every problem found."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a field's type does not say. `choices` are names (an Enum class, an iterable, or a function
  returning one, for registries that can grow); `check(chk, path, value)` records problems of its own."""

  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: Any = None
  check: Callable[["Checker", str, Any], None] | None = None

  def known(self) -> list[str]:
    names = self.choices() if callable(self.choices) and not isinstance(self.choices, type) else self.choices
    if isinstance(names, type) and issubclass(names, enum.Enum):
      names = [m.value for m in names]
    return sorted(str(n) for n in names)


def field(default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
          hi_open: bool = False, choices: Any = None, check: Callable[..., None] | None = None) -> Any:
  """A dataclass field with its `Spec` (see `Spec`)."""
  spec = Spec(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices, check=check)
  return dataclasses.field(default=default, metadata={"spec": spec})


def spec_of(f: dataclasses.Field) -> Spec:
  return f.metadata.get("spec", Spec())


def field_types(cls: type) -> dict[str, Any]:
  """Each field's type, resolved (sections use `from __future__ import annotations`)."""
  return typing.get_type_hints(cls)


def _optional(tp: Any) -> tuple[Any, bool]:
  """(T, True) for `T | None`, else (tp, False)."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) < len(typing.get_args(tp)):
      return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
  return tp, False


# ------------------------------------------------------------------------------------------------
# ConfigDict <-> typed sections.
# ------------------------------------------------------------------------------------------------


def to_config_dict(section: Any) -> ml_collections.ConfigDict:
  """The ConfigDict of a section instance (nested sections become nested ConfigDicts; a field whose
  default is None becomes a typed placeholder, so that `--config.<field>=<value>` can still set it)."""
  out = ml_collections.ConfigDict()
  types_ = field_types(type(section))
  for f in dataclasses.fields(section):
    value = getattr(section, f.name)
    if dataclasses.is_dataclass(value):
      out[f.name] = to_config_dict(value)
    elif value is None:
      tp, _ = _optional(types_[f.name])
      out[f.name] = config_dict.placeholder(tp if isinstance(tp, type) else object)
    else:
      out[f.name] = value
  return out


def from_config(cls: type, node: Any) -> Any:
  """The `cls` instance of a ConfigDict (or a mapping, or a section with the same fields)."""
  types_ = field_types(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    value = node[f.name] if isinstance(node, Mapping) or hasattr(node, "keys") else getattr(node, f.name)
    tp, _ = _optional(types_[f.name])
    if dataclasses.is_dataclass(tp) and value is not None:
      value = from_config(tp, value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[f.name] = value
  return cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# The checker.
# ------------------------------------------------------------------------------------------------


def range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
  if hi is None:
    return f"{'>' if lo_open else '>='} {lo}"
  if lo is None:
    return f"{'<' if hi_open else '<='} {hi}"
  return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


class Checker:
  """Collects problems as `field: message` while reading a config defensively.

  `value(path)` is a field's value once it has passed its own check (MISSING otherwise), for the rules
  that relate fields; `peek(path)` is the raw value (None if absent).
  """

  def __init__(self, config: Any, missing_hint: str):
    self.config = config
    self.problems: list[str] = []
    self._valid: dict[str, Any] = {}
    self._missing_hint = missing_hint

  def add(self, path: str, message: str) -> None:
    self.problems.append(f"{path}: {message}")

  def get(self, path: str) -> Any:
    node = self.config
    for part in path.split("."):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError):
        self.add(path, f"missing ({self._missing_hint})")
        return MISSING
    return node

  def peek(self, path: str) -> Any:
    node = self.config
    for part in path.split("."):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError):
        return None
    return node

  def value(self, path: str) -> Any:
    return self._valid.get(path, MISSING)

  def has_problem_under(self, prefix: str) -> bool:
    return any(p.startswith(prefix) for p in self.problems)

  # ---------------------------------------------------------------- one field
  def check(self, path: str, tp: Any, spec: Spec) -> Any:
    """Checks the field at `path` against its type and spec; returns its value or MISSING."""
    v = self.get(path)
    if v is MISSING:
      return v
    tp, optional = _optional(tp)
    if v is None and optional:
      self._valid[path] = None
      return None
    v = self._typed(path, v, tp)
    if v is MISSING:
      return v
    if spec.choices is not None:
      known = spec.known()
      if v not in known:
        self.add(path, f"unknown name {v!r}; known: {known}")
        return MISSING
    if spec.lo is not None or spec.hi is not None:
      bad_lo = spec.lo is not None and (v <= spec.lo if spec.lo_open else v < spec.lo)
      bad_hi = spec.hi is not None and (v >= spec.hi if spec.hi_open else v > spec.hi)
      if bad_lo or bad_hi:
        self.add(path, f"must be {range_text(spec.lo, spec.hi, spec.lo_open, spec.hi_open)}, got {v!r}")
        return MISSING
    if spec.check is not None:
      before = len(self.problems)
      spec.check(self, path, v)
      if len(self.problems) > before:
        return MISSING
    self._valid[path] = v
    return v

  def _typed(self, path: str, v: Any, tp: Any) -> Any:
    if tp is bool:
      if not isinstance(v, bool):
        self.add(path, f"must be True or False, got {v!r}")
        return MISSING
      return v
    if tp is int or tp is float:
      ok = is_int(v) if tp is int else (is_int(v) or isinstance(v, float))
      if not ok:
        self.add(path, f"must be {'an integer' if tp is int else 'a number'}, got {v!r}")
        return MISSING
      if not math.isfinite(v):
        self.add(path, f"must be finite, got {v!r}")
        return MISSING
      return v
    if tp is str:
      if not isinstance(v, str):
        self.add(path, f"must be a string, got {v!r}")
        return MISSING
      return v
    if typing.get_origin(tp) is tuple:
      item = typing.get_args(tp)[0]
      kind = {int: is_int, str: lambda x: isinstance(x, str),
              float: lambda x: is_int(x) or isinstance(x, float)}.get(item, lambda x: True)
      if not isinstance(v, (tuple, list)) or not all(kind(x) for x in v):
        name = {int: "integers", str: "strings", float: "numbers"}.get(item, "values")
        self.add(path, f"must be a tuple of {name}, got {v!r}")
        return MISSING
      return tuple(v)
    return v  # any other type: its section's rules check it

  def divides(self, path: str, total: Any, what: str, part_path: str, part: Any) -> None:
    if is_int(total) and is_int(part) and part > 0 and total % part:
      self.add(path, f"{total} is not a multiple of {part_path}={part} ({what})")


def check_fields(chk: Checker, prefix: str, cls: type) -> None:
  """Checks every field of the section `cls` found at `prefix`, nested dataclasses (sub-sections, the
  model's `Qwen25VLConfig`) recursively. What a dataclass's own constructor checks beyond the types is
  left to the section's rules."""
  types_ = field_types(cls)
  for f in dataclasses.fields(cls):
    path = f"{prefix}.{f.name}"
    tp = types_[f.name]
    if dataclasses.is_dataclass(tp):
      if chk.get(path) is not MISSING:
        check_fields(chk, path, tp)
      continue
    chk.check(path, tp, spec_of(f))


def known_names(names: Iterable[Any] | type) -> list[str]:
  return Spec(choices=names).known()
