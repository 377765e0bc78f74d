#!/usr/bin/env bash
# rl on three GPUs, one per role: AV policy, frozen AV reference, AR critic (DESIGN.md,
# "Distributed shape"); the policy's actor samples the rollouts itself (ray.rollout_engines=0). The driver reserves
# no GPU; the stage's Ray actors take all three.
# Usage: [RUN_DIR=runs/demo POOL=demo RAY_ADDRESS=http://HEAD:8265] configs/rl-3gpu-per-role.sh [key=value ...]
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-3}"
ENTRYPOINT_NUM_GPUS="${ENTRYPOINT_NUM_GPUS:-0}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
PLACEMENT_ARGS=(placement=per_role ray.enabled=true ray.address=auto ray.gpus_per_actor=1 ray.cpus_per_actor=1)
ROLLOUT_ARGS=(ray.rollout_engines=0)

submit rl "${RUN_ARGS[@]}" "${PLACEMENT_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "$@"
