#!/usr/bin/env bash
# eval on one GPU: every tag on the test split, with baselines and controls (writes fve_report.json
# and the report beside the bundle).
# Usage: [RUN_DIR=runs/demo POOL=demo NUM_GPUS=1 RAY_ADDRESS=...] configs/eval.sh [key=value ...]
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-1}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
STAGE_ARGS=(predictor=nla test_passages=0 max_new_tokens=64 generate_batch_size=32)

submit eval "${RUN_ARGS[@]}" "${STAGE_ARGS[@]}" "$@"
