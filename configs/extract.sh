#!/usr/bin/env bash
# extract on one GPU: the activations of every pooled model at its layer (reads passages.parquet,
# writes activations/<tag>/). Resumable: rerun the same command after a failure.
# Usage: [RUN_DIR=runs/demo POOL=demo NUM_GPUS=1 DEVICE=cuda RAY_ADDRESS=...] configs/extract.sh [key=value ...]
# (key=value arguments come last and override the arrays; `nla-universal extract --help` lists the keys)
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-1}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
STAGE_ARGS=(batch_size=32 batch_tokens=16384 shard_size=256)

submit extract "${RUN_ARGS[@]}" "${STAGE_ARGS[@]}" "$@"
