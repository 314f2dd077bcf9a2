#!/usr/bin/env bash
# Installs this checkout of the project on every worker of the TPU VM:
#   copies the working tree (without .git) to ~/$REMOTE_DIR, creates a Python 3.11 virtual
#   environment in $VENV and installs the project with its TPU extra, plus gcsfs so that
#   gs:// work directories can be written.
#   PROJECT=my-project launch/setup.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require PROJECT
PYTHON="${PYTHON:-python3.11}"
tarball="${TMPDIR:-/tmp}/mgpo_jax_src.tgz"

run tar czf "$tarball" -C "$REPO_DIR" --exclude=.git --exclude=__pycache__ \
  --exclude='*.egg-info' .
tpu_scp "$tarball" "mgpo_jax_src.tgz"

remote="set -e
if ! command -v $PYTHON >/dev/null; then
  sudo apt-get update -qq && sudo apt-get install -y -qq $PYTHON $PYTHON-venv
fi
mkdir -p ~/$REMOTE_DIR && tar xzf ~/mgpo_jax_src.tgz -C ~/$REMOTE_DIR
[ -d $VENV ] || $PYTHON -m venv $VENV
$VENV/bin/pip install -q -U pip
cd ~/$REMOTE_DIR && $VENV/bin/pip install -q -e '.[tpu]' gcsfs
$VENV/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
tpu_ssh all "$remote"
