#!/usr/bin/env bash
# rl on one GPU, colocated: the AV policy, its frozen reference and the AR critic share one device
# and one frozen base (DESIGN.md, "Distributed shape"). The driver reserves no GPU; the stage's Ray
# actors take it (the job's driver attaches to the cluster through the RAY_ADDRESS Ray gives it).
# Usage: [RUN_DIR=runs/demo POOL=demo RAY_ADDRESS=...] configs/rl-1gpu-colocated.sh [key=value ...]
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-1}"
ENTRYPOINT_NUM_GPUS="${ENTRYPOINT_NUM_GPUS:-0}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
PLACEMENT_ARGS=(placement=colocated ray.enabled=true ray.address=auto ray.gpus_per_actor="$NUM_GPUS" ray.cpus_per_actor=1)
ROLLOUT_ARGS=(ray.rollout_engines=0)

submit rl "${RUN_ARGS[@]}" "${PLACEMENT_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "$@"
