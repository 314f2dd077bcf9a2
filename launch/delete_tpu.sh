#!/usr/bin/env bash
# Deletes the TPU VM (everything on its disks is lost; the work directory on GCS stays).
#   PROJECT=my-project launch/delete_tpu.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require PROJECT
mapfile -t flags < <(gcloud_tpu_flags)
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${flags[@]}" --quiet
