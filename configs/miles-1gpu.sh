#!/usr/bin/env bash
# Joint RL under Miles on ONE GPU (colocated: the FSDP AV actor, its SGLang engine and the AR critic share
# it; Miles offloads the actor while SGLang generates). Needs the Miles environment on the head: Miles at
# the commit pinned in miles_patches/__init__.py, sglang-miles, megatron-core (see nla_universal/miles/README.md).
# The run folder's bundle must have been through sft-ar, sft-av and refit-dec; the trained bundle is
# written back to RUN_DIR/bundle and recorded as the rl stage.
# Usage: [RUN_DIR=runs/demo NUM_ROLLOUT=20 RAY_ADDRESS=...] configs/miles-1gpu.sh [--miles-or-nla-flag value ...]
set -euo pipefail
SUBMIT_MODULE=nla_universal.miles.train
NUM_GPUS="${NUM_GPUS:-1}"
ENTRYPOINT_NUM_GPUS="${ENTRYPOINT_NUM_GPUS:-0}"
FORWARD_ENV="${FORWARD_ENV:-NLA_UNIVERSAL_CACHE HF_HUB_OFFLINE HF_HOME PYTHONPATH CUDA_DEVICE_MAX_CONNECTIONS}"
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"

export PYTHONPATH="$NLA_REPO${PYTHONPATH:+:$PYTHONPATH}"  # miles_patches/ lives at the repo root
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

NLA_ARGS=(--nla-run-dir "$RUN_DIR" --nla-critic-placement actor --nla-critic-num-gpus 0.2 --nla-ar-lr 5e-5)
CKPT_ARGS=(--save "$RUN_DIR/rl/miles-ckpt" --load "$RUN_DIR/rl/miles-ckpt" --save-interval "${SAVE_INTERVAL:-5}")
ROLLOUT_ARGS=(--num-rollout "${NUM_ROLLOUT:-20}" --rollout-batch-size 8 --n-samples-per-prompt 4
  --over-sampling-batch-size 8 --global-batch-size 32 --rollout-max-response-len 48 --rollout-temperature 1.0)
GRPO_ARGS=(--advantage-estimator grpo --group-rm --use-kl-loss --kl-loss-type k3 --kl-loss-coef 0.05 --kl-coef 0
  --entropy-coef 0 --eps-clip 0.2)
OPTIMIZER_ARGS=(--optimizer adam --lr 1e-5 --weight-decay 0.0)
SGLANG_ARGS=(--rollout-num-gpus-per-engine 1 --sglang-mem-fraction-static 0.4 --sglang-disable-radix-cache
  --sglang-router-policy round_robin)
TRAIN_ARGS=(--train-backend fsdp --actor-num-nodes 1 --actor-num-gpus-per-node 1 --colocate --micro-batch-size 4)

submit miles-rl "${TRAIN_ARGS[@]}" "${NLA_ARGS[@]}" "${CKPT_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${GRPO_ARGS[@]}" \
  "${OPTIMIZER_ARGS[@]}" "${SGLANG_ARGS[@]}" "$@"
