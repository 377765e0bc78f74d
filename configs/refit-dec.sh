#!/usr/bin/env bash
# refit-dec on one GPU: dec_M by least squares on the AR's outputs for the AV's own explanations
# (rewrites the bundle's adapters).
# Usage: [RUN_DIR=runs/demo POOL=demo NUM_GPUS=1 RAY_ADDRESS=...] configs/refit-dec.sh [key=value ...]
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-1}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
STAGE_ARGS=(source=av train_passages=512 val_passages=128 max_new_tokens=64 generate_batch_size=32)
FIT_ARGS=(fit.min_overlap=32)

submit refit-dec "${RUN_ARGS[@]}" "${STAGE_ARGS[@]}" "${FIT_ARGS[@]}" "$@"
