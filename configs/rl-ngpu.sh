#!/usr/bin/env bash
# rl on N GPUs (NUM_GPUS, default 8, over any number of nodes): one GPU per role (policy,
# reference, critic) and the other N-3 for rollout engines (ROLLOUT_ENGINES overrides). The driver
# reserves no GPU; the stage's Ray actors take them.
# Usage: NUM_GPUS=8 [RUN_DIR=/shared/runs/x POOL=... RAY_ADDRESS=http://HEAD:8265] configs/rl-ngpu.sh [key=value ...]
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-8}"
ENTRYPOINT_NUM_GPUS="${ENTRYPOINT_NUM_GPUS:-0}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

if ! [[ "$NUM_GPUS" =~ ^[0-9]+$ ]] || ((NUM_GPUS < 4)); then
  die "rl-ngpu.sh needs NUM_GPUS >= 4 whole GPUs (3 roles + at least one rollout engine), not $NUM_GPUS" \
    "use configs/rl-3gpu-per-role.sh or configs/rl-1gpu-colocated.sh for fewer GPUs"
fi
ROLLOUT_ENGINES="${ROLLOUT_ENGINES:-$((NUM_GPUS - 3))}"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
PLACEMENT_ARGS=(placement=per_role ray.enabled=true ray.address=auto ray.gpus_per_actor=1 ray.cpus_per_actor=1)
ROLLOUT_ARGS=(ray.rollout_engines="$ROLLOUT_ENGINES")

submit rl "${RUN_ARGS[@]}" "${PLACEMENT_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "$@"
