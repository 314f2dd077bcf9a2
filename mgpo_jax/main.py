"""Runs an MGPO (or single-turn GRPO) experiment.

  python -m mgpo_jax.main --workdir=/tmp/mgpo                               # the cpu_tiny config
  python -m mgpo_jax.main --config=tpu_v5 --workdir=gs://BUCKET/runs/mgpo_7b
  python -m mgpo_jax.main --config=tpu_v5 --workdir=... --config.rollout.num_generations=4
  python -m mgpo_jax.main --config=/path/to/my_experiment.py --workdir=...

`--config` is a packaged config by name (mgpo_jax/configs/<name>.py; `configs/<name>.py` still works, from
any folder) or any experiment file. Every config field can be overridden on the command line
(`--config.<section>.<field>=value`); unknown fields and invalid values stop the run before anything is
built, all of them listed at once, one line each (MGPO_TRACEBACK=1 adds the traceback). Running the same
command again resumes from the latest checkpoint in the workdir; a restart whose config cannot resume
it (other model shapes, dtypes, tokenizer) stops before anything in the workdir is written. On a TPU pod slice run the same command on
every worker (launch/run.sh); CPU/GPU multi-process runs pass --coordinator_address, --num_processes
and --process_id.

The workdir receives: metrics.jsonl (one JSON object per step), tensorboard/ (event files),
rollouts/ (HTML pages of sampled rollouts with their boxes and crops), checkpoints/ (Orbax; usable
as `tools/convert_weights.py --direction=jax_to_hf --src=WORKDIR`), tokenizer/ and tfds/ when built
locally, and hf_export/ when train.export_hf_at_end is set.
"""

from __future__ import annotations

import time
from typing import Sequence

# First: quiets third-party notices printed at import time.
from mgpo_jax.programs import console  # pylint: disable=g-bad-import-order

from absl import app
from absl import flags
import jax

from mgpo_jax import config as config_lib
from mgpo_jax.programs import cli
from mgpo_jax.programs import flags as program_flags
from mgpo_jax.programs import train

_CONFIG = cli.define_config_flag("cpu_tiny", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the run: logs, checkpoints (local or gs://).",
                               required=True)
_MULTIHOST = program_flags.define_multihost_flags()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Log lines go through absl's handler (installed by app.run): "W1130 12:00:00.0 file.py:79] ...".
  console.quiet_third_party()
  started = time.perf_counter()
  config = _CONFIG.load(config_lib.validate)
  _MULTIHOST.init_distributed()
  try:
    train.train(config, _WORKDIR.value)
  except train.Preempted:  # checkpoint saved; exit status 0, with the summary
    _print_summary(started)
    raise
  _print_summary(started)


def _print_summary(started: float) -> None:
  if jax.process_index() == 0:
    print(train.summary(_WORKDIR.value, _CONFIG.value, started), flush=True)


if __name__ == "__main__":
  cli.run(main, "mgpo_jax.main")
