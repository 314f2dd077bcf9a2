#!/usr/bin/env bash
# Starts training on every worker (in the background; the log is ~/mgpo_run.log on each):
#   PROJECT=my-project WORKDIR=gs://my-bucket/runs/mgpo_7b launch/run.sh [--config.FIELD=VALUE ...]
# CONFIG picks the config: a packaged one by name (default tpu_v5; tpu_v4 for v4; configs/<name>.py
# works too) or a file of this repository. Arguments are
# passed on to mgpo_jax.main. Running it again after a preemption resumes from the last checkpoint.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require PROJECT WORKDIR
CONFIG="${CONFIG:-tpu_v5}"
name="${CONFIG#configs/}"
name="${name%.py}"
if [[ ! -f "$REPO_DIR/$CONFIG" && ! -f "$REPO_DIR/mgpo_jax/configs/$name.py" ]]; then
  die "CONFIG=$CONFIG is neither a packaged config (mgpo_jax/configs/<name>.py) nor a file of this repository"
fi

args=(--config="$CONFIG" --workdir="$WORKDIR" "$@")
quoted="$(printf ' %q' "${args[@]}")"
remote="cd ~/$REMOTE_DIR && nohup $VENV/bin/python -m mgpo_jax.main$quoted < /dev/null > ~/$RUN_LOG 2>&1 &
echo \$! > ~/$RUN_PID"
tpu_ssh all "$remote"
