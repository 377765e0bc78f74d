#!/usr/bin/env bash
# Joint RL under Miles on N GPUs (NUM_GPUS, default 8, any number of nodes), disaggregated: ACTOR_GPUS
# (default N/2) train the AV with FSDP (data parallel), the other N-ACTOR_GPUS serve it with SGLang, and
# the AR critic takes a share of AV rank 0's GPU (--nla-critic-placement own: a GPU of its own, then add
# one to NUM_GPUS). Same environment and run folder as configs/miles-1gpu.sh.
# Usage: NUM_GPUS=8 [RUN_DIR=/shared/runs/x RAY_ADDRESS=http://HEAD:8265] configs/miles-ngpu.sh [--flag value ...]
set -euo pipefail
SUBMIT_MODULE=nla_universal.miles.train
NUM_GPUS="${NUM_GPUS:-8}"
ENTRYPOINT_NUM_GPUS="${ENTRYPOINT_NUM_GPUS:-0}"
FORWARD_ENV="${FORWARD_ENV:-NLA_UNIVERSAL_CACHE HF_HUB_OFFLINE HF_HOME PYTHONPATH CUDA_DEVICE_MAX_CONNECTIONS}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

export PYTHONPATH="$NLA_REPO${PYTHONPATH:+:$PYTHONPATH}"  # miles_patches/ lives at the repo root
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

if ! [[ "$NUM_GPUS" =~ ^[0-9]+$ ]] || ((NUM_GPUS < 2)); then
  die "miles-ngpu.sh needs NUM_GPUS >= 2 whole GPUs (training and rollout on separate GPUs), not $NUM_GPUS" \
    "use configs/miles-1gpu.sh on one GPU"
fi
ACTOR_GPUS="${ACTOR_GPUS:-$((NUM_GPUS / 2))}"
ROLLOUT_GPUS=$((NUM_GPUS - ACTOR_GPUS))
((ACTOR_GPUS >= 1 && ROLLOUT_GPUS >= 1)) || die "ACTOR_GPUS=$ACTOR_GPUS leaves $ROLLOUT_GPUS GPU(s) for SGLang" \
  "set ACTOR_GPUS between 1 and NUM_GPUS-1"
GLOBAL_BATCH=$((${PROMPTS:-32} * ${SAMPLES:-8}))

NLA_ARGS=(--nla-run-dir "$RUN_DIR" --nla-critic-placement actor --nla-critic-num-gpus 0.5 --nla-ar-lr 5e-5)
CKPT_ARGS=(--save "$RUN_DIR/rl/miles-ckpt" --load "$RUN_DIR/rl/miles-ckpt" --save-interval "${SAVE_INTERVAL:-10}")
ROLLOUT_ARGS=(--num-rollout "${NUM_ROLLOUT:-200}" --rollout-batch-size "${PROMPTS:-32}" --n-samples-per-prompt
  "${SAMPLES:-8}" --over-sampling-batch-size "${PROMPTS:-32}" --global-batch-size "$GLOBAL_BATCH"
  --rollout-max-response-len 96 --rollout-temperature 1.0)
GRPO_ARGS=(--advantage-estimator grpo --group-rm --use-kl-loss --kl-loss-type k3 --kl-loss-coef 0.05 --kl-coef 0
  --entropy-coef 0 --eps-clip 0.2)
OPTIMIZER_ARGS=(--optimizer adam --lr 1e-5 --weight-decay 0.0)
SGLANG_ARGS=(--rollout-num-gpus "$ROLLOUT_GPUS" --rollout-num-gpus-per-engine 1 --sglang-mem-fraction-static 0.8
  --sglang-disable-radix-cache --sglang-router-policy round_robin)
TRAIN_ARGS=(--train-backend fsdp --actor-num-nodes 1 --actor-num-gpus-per-node "$ACTOR_GPUS" --micro-batch-size 8)

submit miles-rl "${TRAIN_ARGS[@]}" "${NLA_ARGS[@]}" "${CKPT_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${GRPO_ARGS[@]}" \
  "${OPTIMIZER_ARGS[@]}" "${SGLANG_ARGS[@]}" "$@"
