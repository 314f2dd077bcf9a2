"""The `repro` section of configs/repro_scenes.py: the comparison's seeds, arms and base.

Described like the experiment's sections (`mgpo_jax.config.sections`): the checks are generated from
these fields, and `python -m mgpo_jax.repro` validates the section with the rest of the config.
"""

from __future__ import annotations

import dataclasses

from mgpo_jax.config.fields import Checker, field

# arm -> (rollout.single_turn, rollout.random_crop)
METHODS: dict[str, tuple[bool, bool]] = {"mgpo": (False, False), "grpo": (True, False), "control": (False, True)}


def _methods(chk: Checker, path: str, methods: tuple[str, ...]) -> None:
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    chk.add(path, f"must name one or more of {sorted(METHODS)}, got {methods}")


@dataclasses.dataclass(frozen=True)
class Repro:
  seeds: tuple[int, ...] = (0, 1, 2)
  methods: tuple[str, ...] = field(("mgpo", "grpo", "control"), check=_methods)
  base_dir: str = ""  # The RL runs' starting point (an HF folder); "" = the committed base, mgpo_jax/repro/base.
  gates_num: int = field(128, lo=1)  # Held-out scenes of the base's gates (written once per workdir).
