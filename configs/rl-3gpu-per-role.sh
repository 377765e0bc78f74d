#!/usr/bin/env bash
# rl on three GPUs, one per role: AV policy, frozen AV reference, AR critic (DESIGN.md,
# "Distributed shape"); the in-process rollout engine runs beside the policy. The driver reserves
# no GPU; the stage's Ray actors take all three.
# The rl stage is being designed: its keys live only in PLACEMENT_ARGS and ROLLOUT_ARGS.
# Usage: [RUN_DIR=runs/demo POOL=demo RAY_ADDRESS=http://HEAD:8265] configs/rl-3gpu-per-role.sh [key=value ...]
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-3}"
ENTRYPOINT_NUM_GPUS="${ENTRYPOINT_NUM_GPUS:-0}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
PLACEMENT_ARGS=(rl.placement=per_role)
ROLLOUT_ARGS=(rl.rollout_engines=1)

submit rl "${RUN_ARGS[@]}" "${PLACEMENT_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "$@"
