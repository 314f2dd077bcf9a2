"""The processes of a multi-host run: joining them, waiting for each other, and small reductions.

Every function is a no-op (or the identity) in a single-process run, so callers need no branch of
their own.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def init_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Joins the other processes of a multi-host run (a no-op for a single process).

  With a coordinator address (CPU tests, GPU clusters) the three values are given explicitly; on a
  TPU pod slice `jax.distributed.initialize()` finds them itself (TPU_WORKER_HOSTNAMES lists >1 host).
  """
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < "
                       f"num_processes, got {num_processes} and {process_id}")
    # Cross-process collectives of the CPU backend (tests); no effect on TPU/GPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  elif len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    jax.distributed.initialize()


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def global_max(*values: int) -> list[int]:
  """Element-wise max over processes (all processes must pick the same static shapes)."""
  v = np.asarray(values, np.int64)
  if jax.process_count() > 1:
    v = np.asarray(multihost_utils.process_allgather(v)).max(axis=0)
  return [int(x) for x in v]


def global_mean(values: dict[str, float]) -> dict[str, float]:
  """Each value's mean over processes (every process passes the same keys)."""
  if jax.process_count() == 1 or not values:
    return values
  keys = sorted(values)
  v = np.asarray(multihost_utils.process_allgather(np.asarray([values[k] for k in keys], np.float64)))
  return dict(zip(keys, v.mean(axis=0).tolist()))


def global_sum(array: np.ndarray) -> np.ndarray:
  """`array` summed over processes."""
  if jax.process_count() == 1:
    return array
  return np.asarray(multihost_utils.process_allgather(array)).sum(axis=0)


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
