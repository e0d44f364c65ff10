# Quick start: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test install bench clean

# torch==2.13.0 first: on a CPU machine that is a CPU wheel; an unpinned torch would pull a CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/tw-rl demo --out $(OUT)

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/.installed
	$(BIN)/python bench/rollout.py

clean:
	rm -rf $(VENV) runs
