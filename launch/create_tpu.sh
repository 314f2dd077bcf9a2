#!/usr/bin/env bash
# Creates the TPU VM (all its workers): ACCELERATOR=v4-32 | v5litepod-16 | v5p-64 | ...
#   PROJECT=my-project ZONE=us-east5-a ACCELERATOR=v5p-64 launch/create_tpu.sh
# SPOT=1 asks for spot capacity (cheaper, can be preempted; the run resumes from its checkpoint).
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require PROJECT
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR")}"
mapfile -t flags < <(gcloud_tpu_flags)
extra=()
if [[ "${SPOT:-0}" == "1" ]]; then
  extra+=(--spot)
fi

run gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" \
  --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION" "${extra[@]}"
