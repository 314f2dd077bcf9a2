"""Command-line flags the programs share: the multi-process ones of `main` and `evaluate`."""

from __future__ import annotations

import dataclasses

from absl import flags

from mgpo_jax.parallel import processes


@dataclasses.dataclass(frozen=True)
class MultihostFlags:
  """--coordinator_address, --num_processes, --process_id (multi-process runs off TPU pods)."""

  coordinator_address: flags.FlagHolder[str]
  num_processes: flags.FlagHolder[int]
  process_id: flags.FlagHolder[int]

  def init_distributed(self) -> None:
    """Joins the run's other processes (TPU pod slices are detected without the flags)."""
    processes.init_distributed(self.coordinator_address.value, self.num_processes.value, self.process_id.value)


def define_multihost_flags() -> MultihostFlags:
  """Defines the three flags (call once, at a program's import)."""
  return MultihostFlags(
      coordinator_address=flags.DEFINE_string(
          "coordinator_address", "", "host:port of process 0, for multi-process runs off TPU pods "
          "(TPU pods are detected automatically)."),
      num_processes=flags.DEFINE_integer("num_processes", 0, "Processes of the run (with --coordinator_address)."),
      process_id=flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address)."))
