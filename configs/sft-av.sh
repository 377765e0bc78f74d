#!/usr/bin/env bash
# sft-av on one GPU: AV SFT, the injected shared vector -> teacher z (needs the bundle of sft-ar).
# Resumes from its last checkpoint when rerun.
# Usage: [RUN_DIR=runs/demo POOL=demo NUM_GPUS=1 STEPS=1500 RAY_ADDRESS=...] configs/sft-av.sh [key=value ...]
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-1}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
LOOP_ARGS=(loop.steps="${STEPS:-1500}" loop.lr=5e-4 loop.batch_size=16 loop.eval_every=0 loop.checkpoint_every=25)
STAGE_ARGS=(max_new_tokens=64)

submit sft-av "${RUN_ARGS[@]}" "${LOOP_ARGS[@]}" "${STAGE_ARGS[@]}" "$@"
