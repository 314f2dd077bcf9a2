"""Writes constraints.txt: the exact versions, in this environment, of everything `mgpo_jax[test]` needs.

  pip install -e '.[test]' -c constraints.txt && python tools/lock_constraints.py   # after an upgrade that passed CI

The README's install commands pass `-c constraints.txt`, so a fresh install gets the versions CI passed
with, not whatever was released last night; pyproject.toml keeps the ranges the code supports.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def closure(top: str, extras: tuple[str, ...]) -> dict[str, str]:
  """{distribution: installed version} of `top`'s requirements (with `extras`), transitively."""
  seen: dict[str, str] = {}
  todo = [(top, set(extras))]
  while todo:
    name, wanted = todo.pop()
    dist = md.distribution(name)
    for text in dist.requires or []:
      req = Requirement(text)
      env_ok = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (wanted or {""}))
      if not env_ok:
        continue
      key = _norm(req.name)
      if key in seen:
        continue
      try:
        seen[key] = md.version(req.name)
      except md.PackageNotFoundError:
        continue  # an optional dependency of a dependency that this platform does not install
      todo.append((req.name, set(req.extras)))
  seen.pop(_norm(top), None)
  return seen


def main() -> int:
  pins = closure("mgpo_jax", ("test",))
  lines = [f"{name}=={version.split('+')[0]}" for name, version in sorted(pins.items())]
  header = ("# Exact versions CI passed with (python tools/lock_constraints.py; Python "
            f"{sys.version_info.major}.{sys.version_info.minor}, {sys.platform}).\n")
  with open(os.path.join(ROOT, "constraints.txt"), "w", encoding="utf-8") as f:
    f.write(header + "\n".join(lines) + "\n")
  print(f"wrote {len(lines)} pins to constraints.txt")
  return 0


if __name__ == "__main__":
  sys.exit(main())
