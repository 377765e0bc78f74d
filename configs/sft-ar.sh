#!/usr/bin/env bash
# sft-ar on one GPU: AR SFT, teacher z -> the shared vector (creates the bundle). Resumes from its
# last checkpoint when rerun.
# Usage: [RUN_DIR=runs/demo POOL=demo NUM_GPUS=1 STEPS=1000 RAY_ADDRESS=...] configs/sft-ar.sh [key=value ...]
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-1}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
LOOP_ARGS=(loop.steps="${STEPS:-1000}" loop.lr=2e-4 loop.batch_size=16 loop.eval_every=0 loop.checkpoint_every=25)
STAGE_ARGS=(val_passages=48)

submit sft-ar "${RUN_ARGS[@]}" "${LOOP_ARGS[@]}" "${STAGE_ARGS[@]}" "$@"
