# vaelab: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SPEC   ?= quickstart
EXP    ?= beta_study
ARGS   ?=

.PHONY: help install test test-slow test-cluster test-gpu services lint bench bench-cluster bench-hostile train sweep worker report dashboard ui clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(BIN)/vaelab  ## create .venv and install vaelab with its dependencies

$(BIN)/vaelab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

test: install  ## ruff and mypy, then the test suite (slow tests excluded), one pytest worker per core
	$(BIN)/ruff check vaelab tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow and not cluster and not gpu" -q -n auto --dist loadscope

test-slow: install  ## run only the slow tests (the 200-trial soak test with random worker kills, make bench's quick run)
	$(BIN)/python -m pytest -m slow -q -s

test-cluster: install  ## the cluster tests: services and workers on separate network namespaces, faults injected, the services' privileges, Slurm sweeps on a one-node cluster: submission, preemption, time limits (root; ~17 min)
	$(BIN)/python -m pytest -m cluster -q -s tests/test_cluster.py tests/test_slurm.py tests/test_services.py

test-gpu: install  ## the CUDA path (compile, bf16, stacks, streaming, resume, workers) against eager fp32 on a GPU
	$(BIN)/python -m pytest -m gpu -q tests/test_gpu.py

bench-cluster: install  ## 16 workers with tiny runs on the shared stack: claims/s, claim latency -> bench/CLUSTER.md
	$(BIN)/python -m bench.cluster $(ARGS)

services: install  ## a lab's shared stack: PostgreSQL + MLflow server with basic auth [ARGS="--host 10.0.0.5"]
	$(BIN)/vaelab services $(ARGS)

lint: install  ## ruff over the package and tests, mypy over the package
	$(BIN)/ruff check vaelab tests bench
	$(BIN)/mypy

bench-hostile: install  ## hostile and careless inputs against the real commands: each refused in one line? -> bench/HOSTILE.md
	$(BIN)/python -m bench.hostile $(ARGS)

bench: install  ## vaelab vs the canonical PyTorch VAE example, side by side -> bench/RESULTS.md
	$(BIN)/python -m bench $(ARGS)

train: install  ## train one run: make train SPEC=quickstart [ARGS="--set model.z_dim=10"]
	$(BIN)/vaelab train experiments/$(SPEC).yaml $(ARGS)

sweep: install  ## run a whole study, resumable: make sweep EXP=beta_study [ARGS="--workers 2"]
	$(BIN)/vaelab sweep experiments/$(EXP).yaml $(ARGS)

worker: install  ## join a running sweep as one more worker: make worker EXP=beta_study [ARGS="--storage URL"]
	$(BIN)/vaelab worker experiments/$(EXP).yaml $(ARGS)

report: install  ## markdown report of a study from the tracking store: make report EXP=beta_study
	$(BIN)/vaelab report experiments/$(EXP).yaml $(ARGS)

dashboard: install  ## optuna-dashboard over a study on http://127.0.0.1:8080: make dashboard EXP=beta_study [ARGS="--port 8081"]
	$(BIN)/vaelab dashboard experiments/$(EXP).yaml $(ARGS)

ui: install  ## MLflow UI over runs/ on http://127.0.0.1:5000
	$(BIN)/vaelab ui

clean:  ## remove caches (keeps runs/ and studies/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
