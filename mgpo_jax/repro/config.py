"""The `repro` section of configs/repro_synthetic.py: the comparison's seeds and methods and its warm-up.

Described like the experiment's sections (`mgpo_jax.config.sections`): the checks are generated from
these fields, and `python -m mgpo_jax.repro` validates the section with the rest of the config.
"""

from __future__ import annotations

import dataclasses

from mgpo_jax.config.fields import Checker, field

METHODS = {"mgpo": False, "grpo": True}  # name -> rollout.single_turn


def _methods(chk: Checker, path: str, methods: tuple[str, ...]) -> None:
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    chk.add(path, f"must name one or more of {sorted(METHODS)}, got {methods}")


@dataclasses.dataclass(frozen=True)
class ReproSFT:
  """The supervised warm-up before RL (`mgpo_jax.repro.warmup`)."""

  # Perception stage: one-image close-up rows (single_turn_view="close_up"), short buckets.
  perception_steps: int = field(400, lo=0)
  perception_seq_bucket: int = field(256, lo=1)
  perception_patch_bucket: int = field(256, lo=1)
  steps: int = field(300, lo=1)
  batch_size: int = field(16, lo=1)
  learning_rate: float = field(2e-3, lo=0.0, lo_open=True)
  min_lr_ratio: float = field(0.5, lo=0.0, hi=1.0)
  warmup_steps: int = field(20, lo=0)
  num_samples: int = field(1000, lo=1)
  data_seed: int = field(100, lo=0)  # + the run's seed; the RL sets use seeds 0 (train) and 1 (eval)
  box_grid: int = field(3, lo=1)
  close_up_min_side: float = field(1.5, lo=0.0, lo_open=True)
  single_turn_view: str = field("close_up", choices=("full", "close_up"))
  mix: tuple[float, ...] = (2.0, 1.0, 1.0)  # format / close-up / single-turn rows
  seq_bucket: int = field(384, lo=1)
  patch_bucket: int = field(512, lo=1)


@dataclasses.dataclass(frozen=True)
class Repro:
  seeds: tuple[int, ...] = (0, 1, 2)
  methods: tuple[str, ...] = field(("mgpo", "grpo"), check=_methods)
  box_label: str = "key region"  # the JSON label of every warm-up box
  sft: ReproSFT = ReproSFT()
