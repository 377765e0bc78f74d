#!/usr/bin/env bash
# teach on one GPU: one teacher explanation z per passage (fills z in passages.parquet).
# The default teacher is a local causal LM run in the job (hf). For an OpenAI-compatible endpoint,
# TEACHER_BACKEND=openai TEACHER_MODEL=... TEACHER_BASE_URL=... NUM_GPUS=0: the API key must be in
# the environment of the process that runs the job, named by teacher.api_key_env. A local head
# started by this script inherits it from here; on a cluster, export it on the head before
# `ray start`. Never forward it through FORWARD_ENV: a job's runtime env shows in `ray job list`.
# Usage: [RUN_DIR=runs/demo POOL=demo NUM_GPUS=1 RAY_ADDRESS=...] configs/teach.sh [key=value ...]
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-1}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

RUN_ARGS=(run.run_dir="$RUN_DIR" run.pool="$POOL" run.device="$DEVICE")
TEACHER_ARGS=(
  teacher.backend="${TEACHER_BACKEND:-hf}"
  teacher.model="${TEACHER_MODEL:-smollm2-135m-instruct}"
  teacher.max_tokens=64
  teacher.max_input_chars=1000
  teacher.batch_size=32
)
[[ -z "${TEACHER_BASE_URL:-}" ]] || TEACHER_ARGS+=(teacher.base_url="$TEACHER_BASE_URL")

submit teach "${RUN_ARGS[@]}" "${TEACHER_ARGS[@]}" "$@"
