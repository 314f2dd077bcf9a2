#!/usr/bin/env bash
# Stops the training started by run.sh on every worker (SIGTERM: the run saves a checkpoint first).
#   PROJECT=my-project launch/stop.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require PROJECT
tpu_ssh all "if [ -f ~/$RUN_PID ]; then kill -TERM \$(cat ~/$RUN_PID) 2>/dev/null || true; rm -f ~/$RUN_PID; fi"
