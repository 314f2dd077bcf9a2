#!/usr/bin/env bash
# Puts the weights and data on every worker under /data (the paths configs/base.py uses):
#   DATA_MODE=rsync  (default) copies GCS_DATA to each worker's disk: fast reads, needs the space.
#   DATA_MODE=gcsfuse mounts GCS_DATA read-only at /data: no copy, reads go to GCS.
#   PROJECT=my-project GCS_DATA=gs://my-bucket/mgpo/data launch/data.sh
# GCS_DATA holds models/Qwen2.5-VL-7B-Instruct/, tfds/ (the built dataset), vstar/, mme_realworld/.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require PROJECT GCS_DATA
DATA_MODE="${DATA_MODE:-rsync}"
DATA_DIR="${DATA_DIR:-/data}"
if [[ "$GCS_DATA" != gs://* ]]; then
  die "GCS_DATA must be a gs:// path, got '$GCS_DATA'"
fi

case "$DATA_MODE" in
  rsync)
    remote="set -e
sudo mkdir -p $DATA_DIR && sudo chown \$(id -u):\$(id -g) $DATA_DIR
gcloud storage rsync --recursive $GCS_DATA $DATA_DIR"
    ;;
  gcsfuse)
    bucket="${GCS_DATA#gs://}"
    prefix="${bucket#*/}"
    bucket="${bucket%%/*}"
    if [[ "$prefix" == "$bucket" ]]; then
      prefix=""
    fi
    remote="set -e
if ! command -v gcsfuse >/dev/null; then
  export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
  echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
sudo mkdir -p $DATA_DIR && sudo chown \$(id -u):\$(id -g) $DATA_DIR
mountpoint -q $DATA_DIR || gcsfuse -o ro --implicit-dirs ${prefix:+--only-dir $prefix} $bucket $DATA_DIR"
    ;;
  *)
    die "DATA_MODE must be rsync or gcsfuse, got '$DATA_MODE'"
    ;;
esac
tpu_ssh all "$remote"
