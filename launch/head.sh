#!/usr/bin/env bash
# A local Ray head kept across several stages: `start` prints the variables to export so that
# configs/*.sh attach to it; `stop` ends only the head recorded in RUN_DIR/ray-head.env (also
# after a launcher was killed with SIGKILL and could not stop its own); `status` shows it.
# Usage: [RUN_DIR=runs/demo HEAD_NUM_CPUS=.. HEAD_NUM_GPUS=..] launch/head.sh start|stop|status
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

case "${1:-}" in
  start)
    [[ -z "${RAY_ADDRESS:-}" ]] || die "RAY_ADDRESS=$RAY_ADDRESS is set, so the configs would attach there" "unset RAY_ADDRESS to start a local head"
    resolve_auth_mode
    start_local_head
    check_cluster
    LOCAL_HEAD_ID= # it outlives this script: launch/head.sh stop ends it
    echo "export RAY_ADDRESS=$RAY_ADDRESS RAY_AUTH_MODE=$RAY_AUTH_MODE"
    ;;
  stop)
    stop_local_head
    echo "stopped the Ray head recorded in $(head_state_file) (if any was running)" >&2
    ;;
  status)
    [[ -f "$(head_state_file)" ]] || die "no Ray head recorded for RUN_DIR=$RUN_DIR" "launch/head.sh start, or set RUN_DIR"
    cat "$(head_state_file)"
    id="$(sed -n 's/^HEAD_ID=//p' "$(head_state_file)")"
    echo "RUNNING_PIDS=\"$(head_pids "$id" | tr '\n' ' ' | sed 's/ $//')\""
    ;;
  *) die "unknown command '${1:-}'" "launch/head.sh start | stop | status" ;;
esac
