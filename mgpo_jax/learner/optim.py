"""AdamW with global-norm clipping and a learning-rate schedule, from a small frozen config.

Defaults are the MGPO paper's (verl's FSDP actor): AdamW lr 1e-6 constant, betas (0.9, 0.999),
eps 1e-8, weight decay 0.01 on every parameter (verl passes all parameters to torch AdamW, norms
and biases included), gradient clipping at global norm 1.0.

    tx = make_optimizer(OptimConfig(learning_rate=1e-6))
    lr_at_step = make_schedule(cfg)(step)
"""

from __future__ import annotations

import dataclasses
import enum

import optax


class Schedule(enum.Enum):
  """Learning-rate schedule shapes."""

  CONSTANT = "constant"  # linear warmup over `warmup_steps` (0: none), then constant
  COSINE = "cosine"      # linear warmup, then cosine decay to `min_lr_ratio * lr` at `total_steps`


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer hyper-parameters (one optimizer step = one mini-batch update).

  Attributes:
    learning_rate: peak learning rate.
    weight_decay: decoupled (AdamW) weight decay, applied to every parameter.
    b1, b2, eps: Adam moments' decay rates and denominator epsilon.
    grad_clip_norm: clip the gradient to this global L2 norm before Adam; None disables clipping.
    schedule: `Schedule` (or its value string).
    warmup_steps: linear warmup from 0 to `learning_rate` over this many steps.
    total_steps: steps of warmup + decay (COSINE only).
    min_lr_ratio: final lr of COSINE as a fraction of `learning_rate`.
  """

  learning_rate: float = 1e-6
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip_norm: float | None = 1.0
  schedule: Schedule = Schedule.CONSTANT
  warmup_steps: int = 0
  total_steps: int | None = None
  min_lr_ratio: float = 0.0

  def __post_init__(self):
    if not isinstance(self.schedule, Schedule):
      try:
        object.__setattr__(self, "schedule", Schedule(self.schedule))
      except ValueError:
        raise ValueError(
            f"schedule={self.schedule!r} is not one of {[s.value for s in Schedule]}.") from None
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
    if self.weight_decay < 0:
      raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise ValueError(f"b1, b2 must be in [0, 1), got {self.b1}, {self.b2}.")
    if not self.eps > 0:
      raise ValueError(f"eps must be > 0, got {self.eps}.")
    if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
      raise ValueError(f"grad_clip_norm must be > 0 (or None), got {self.grad_clip_norm}.")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
    if self.schedule is Schedule.COSINE:
      if self.total_steps is None or self.total_steps <= self.warmup_steps:
        raise ValueError(
            f"schedule=cosine needs total_steps > warmup_steps, got total_steps={self.total_steps}, "
            f"warmup_steps={self.warmup_steps}.")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Learning rate as a function of the optimizer step count (0-based)."""
  lr = cfg.learning_rate
  if cfg.schedule is Schedule.COSINE:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps, end_value=lr * cfg.min_lr_ratio)
  if cfg.warmup_steps == 0:
    return optax.constant_schedule(lr)
  # As HF/verl's `get_constant_schedule_with_warmup`: lr = lr * step / warmup_steps, then constant.
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, cfg.warmup_steps), optax.constant_schedule(lr)],
      [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """`clip_by_global_norm` (optional) followed by AdamW driven by `make_schedule(cfg)`."""
  adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay)
  if cfg.grad_clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
