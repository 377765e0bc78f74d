#!/usr/bin/env bash
# fit-adapters: least-squares enc_M (against the anchor) and linear-ceiling dec_M for every pooled
# model (reads activations/, writes adapters/). The solves run in float64 on the CPU, so this one
# reserves no GPU by default (NUM_GPUS=0, DEVICE=cpu).
# Usage: [RUN_DIR=runs/demo POOL=demo NUM_CPUS=1 RAY_ADDRESS=...] configs/fit-adapters.sh [key=value ...]
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-0}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
FIT_ARGS=(fit.min_overlap=32 centre=true)

submit fit-adapters "${RUN_ARGS[@]}" "${FIT_ARGS[@]}" "$@"
