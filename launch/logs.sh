#!/usr/bin/env bash
# Shows the training log of one worker (WORKER=0 by default; process 0 logs the metrics):
#   PROJECT=my-project launch/logs.sh            follow the log (Ctrl-C to stop watching)
#   PROJECT=my-project FOLLOW=0 LINES=500 WORKER=3 launch/logs.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require PROJECT
WORKER="${WORKER:-0}"
LINES="${LINES:-100}"
follow=""
if [[ "${FOLLOW:-1}" == "1" ]]; then
  follow="-f"
fi
tpu_ssh "$WORKER" "tail -n $LINES $follow ~/$RUN_LOG"
