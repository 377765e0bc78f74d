#!/usr/bin/env bash
# rl on one GPU, colocated: the AV policy, its frozen reference and the AR critic share one device
# and one frozen base (DESIGN.md, "Distributed shape"). The driver reserves no GPU; the stage's Ray
# actors take it (the job's driver attaches to the cluster through the RAY_ADDRESS Ray gives it).
# The rl stage is being designed: its keys live only in PLACEMENT_ARGS and ROLLOUT_ARGS, one array
# per concern, so renaming a key is a one-line change here.
# Usage: [RUN_DIR=runs/demo POOL=demo RAY_ADDRESS=...] configs/rl-1gpu-colocated.sh [key=value ...]
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-1}"
ENTRYPOINT_NUM_GPUS="${ENTRYPOINT_NUM_GPUS:-0}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
PLACEMENT_ARGS=(rl.placement=colocated)
ROLLOUT_ARGS=(rl.rollout_engines=1)

submit rl "${RUN_ARGS[@]}" "${PLACEMENT_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "$@"
