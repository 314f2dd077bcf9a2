"""Runs an MGPO (or single-turn GRPO) experiment.

  python -m mgpo_jax.main --workdir=/tmp/mgpo                               # configs/cpu_tiny.py
  python -m mgpo_jax.main --config=configs/tpu_v5.py --workdir=gs://BUCKET/runs/mgpo_7b
  python -m mgpo_jax.main --config=configs/tpu_v5.py --workdir=... --config.rollout.num_generations=4

Every config field can be overridden on the command line (`--config.<section>.<field>=value`); an
unknown field or an invalid value stops the run before anything is built. Running the same command
again resumes from the latest checkpoint in the workdir. On a TPU pod slice run the same command on
every worker (launch/run.sh); CPU/GPU multi-process runs pass --coordinator_address, --num_processes
and --process_id.

The workdir receives: metrics.jsonl (one JSON object per step), tensorboard/ (event files),
rollouts/ (HTML pages of sampled rollouts with their boxes and crops), checkpoints/ (Orbax; usable
as `tools/convert_weights.py --direction=jax_to_hf --src=WORKDIR`), tokenizer/ and tfds/ when built
locally, and hf_export/ when train.export_hf_at_end is set.
"""

from __future__ import annotations

import logging
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from mgpo_jax.programs import flags as program_flags
from mgpo_jax.programs import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/cpu_tiny.py", "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the run: logs, checkpoints (local or gs://).",
                               required=True)
_MULTIHOST = program_flags.define_multihost_flags()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Log lines go through absl's handler (installed by app.run): "W1130 12:00:00.0 file.py:79] ...".
  for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  _MULTIHOST.init_distributed()
  train.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
