# Settings and helpers shared by the launch scripts; sourced, never run on its own.
# shellcheck shell=bash
#
# Every setting comes from the environment, with the defaults below:
#   PROJECT          Google Cloud project (required)
#   ZONE             zone of the TPU VM                     (default: us-east5-a, a v5p zone)
#   TPU_NAME         name of the TPU VM                      (default: mgpo-$USER)
#   ACCELERATOR      v4-32, v4-64, v5litepod-16, v5p-64, ... (default: v5p-64)
#   RUNTIME_VERSION  TPU software version (default: picked from ACCELERATOR's generation)
#   REMOTE_DIR       project folder on the workers, under ~  (default: mgpo_jax)
#   VENV             Python virtual environment on the workers (default: ~/mgpo_venv)
#   DRY_RUN=1        print the commands instead of running them

set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # Used by the scripts that source this file.
REPO_DIR="$(cd "$LAUNCH_DIR/.." && pwd)"

ZONE="${ZONE:-us-east5-a}"
TPU_NAME="${TPU_NAME:-mgpo-${USER:-user}}"
ACCELERATOR="${ACCELERATOR:-v5p-64}"
REMOTE_DIR="${REMOTE_DIR:-mgpo_jax}"
# Paths on the workers keep "~" unexpanded here: the workers' shells expand it.
VENV="${VENV:-~/mgpo_venv}"
DRY_RUN="${DRY_RUN:-0}"
# shellcheck disable=SC2034  # Used by the scripts that source this file (relative to ~ remotely).
RUN_LOG="mgpo_run.log"
# shellcheck disable=SC2034
RUN_PID="mgpo_run.pid"

die() {
  echo "error: $*" >&2
  exit 1
}

# require VAR...: fail with the variable's name if any is unset or empty.
require() {
  local var
  for var in "$@"; do
    if [[ -z "${!var:-}" ]]; then
      die "set $var in the environment (see launch/README.md)"
    fi
  done
}

default_runtime_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "unknown ACCELERATOR '$1' (expected v4-N, v5litepod-N, v5p-N or v6e-N)" ;;
  esac
}

# run CMD...: run a command, or print it (shell-quoted) when DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

gcloud_tpu_flags() {
  printf '%s\n' "--zone=$ZONE" "--project=$PROJECT"
}

# tpu_ssh WORKER COMMAND: run COMMAND on one worker (0, 1, ...) or on all of them ("all").
tpu_ssh() {
  local worker="$1" command="$2"
  local flags
  mapfile -t flags < <(gcloud_tpu_flags)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker="$worker" \
    --command="$command"
}

# tpu_scp SRC DEST: copy a local file to ~/DEST on every worker.
tpu_scp() {
  local src="$1" dest="$2"
  local flags
  mapfile -t flags < <(gcloud_tpu_flags)
  run gcloud compute tpus tpu-vm scp "$src" "$TPU_NAME:$dest" "${flags[@]}" --worker=all
}
