# likerank — the command index. `make help` lists every target.
SHELL := bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The setup is reused while these files are unchanged (content hash, not mtime: a fresh clone counts).
SETUP_HASH := $(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
STAMP  := $(VENV)/.setup-$(SETUP_HASH)

export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
# The default (32) forks 32 LocalExecutor workers of ~140 MB each; 2 suits a small machine.
export AIRFLOW__CORE__PARALLELISM := 2
export AIRFLOW__LOGGING__LOGGING_LEVEL := INFO
export PATH := $(CURDIR)/$(BIN):$(PATH)

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

setup: $(STAMP) .airflow/airflow.db ## create .venv from requirements.lock (GPU=1: onnxruntime-gpu), migrate Airflow's SQLite DB; no-op when unchanged

$(STAMP): requirements.lock pyproject.toml
	@echo "setup: installing into $(VENV) from requirements.lock (first time: a few minutes, ~6 GB)"
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	# (pip warns once per package about this machine's extra index folders: noise, filtered)
	{ $(BIN)/pip install -q --disable-pip-version-check -r requirements.lock 2>&1 || exit 1; } | { grep -v '^WARNING: Location' || true; }
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	# GPU=1: onnxruntime-gpu replaces onnxruntime (both own the `onnxruntime` module; insightface needs either)
	$(if $(GPU),$(BIN)/pip uninstall -y -q onnxruntime && $(BIN)/pip install -q "onnxruntime-gpu[cuda$(,)cudnn]==$(ORT_VERSION)",)
	rm -f $(VENV)/.setup-*
	touch $@

, := ,
ORT_VERSION := $(shell sed -n 's/^onnxruntime==//p' requirements.lock)

.airflow/airflow.db: $(STAMP)
	mkdir -p .airflow
	$(BIN)/airflow db migrate > .airflow/migrate.log 2>&1 || { tail -20 .airflow/migrate.log; exit 1; }
	touch $@

run: setup ## run the whole chain on the embedded default; SOURCE_URL=https://… TAG=selfie for a real Mastodon instance
	$(if $(SOURCE_URL),LIKERANK_SOURCE__KIND=live LIKERANK_SOURCE__PLATFORMS=mastodon LIKERANK_SOURCE__INSTANCE_URL=$(SOURCE_URL) LIKERANK_SOURCE__HASHTAGS=$(or $(TAG),selfie)) \
	  $(BIN)/python -m likerank.orchestrate

test: setup ## run the import contracts and the whole test suite (what CI runs)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup ## the import contracts and every test that is not slow, S3 or distributed (a few minutes)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -m "not slow and not s3 and not distributed" $(PYTEST_ARGS)

bench: setup ## run the benchmarks; each prints its figures as ratios against a baseline
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b; done

airflow: setup ## the demo world under the real scheduler: UI on http://127.0.0.1:8080, home .airflow-live, tables in data-live (Ctrl-C stops it)
	AIRFLOW_HOME=$(CURDIR)/.airflow-live exec $(BIN)/python -m likerank.orchestrate live

retrain: setup ## fine-tune on the latest published labels (through the scheduler if `make airflow` runs; WAIT=1 waits and exits with the run's state)
	$(BIN)/likerank retrain $(if $(WAIT),--wait)

lock: setup ## rewrite requirements.lock from the working .venv (after a deliberate upgrade)
	{ sed -n '1,2p' requirements.lock; $(BIN)/pip freeze --exclude-editable | LC_ALL=C sort -f; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

lint: setup ## ruff
	$(BIN)/ruff check likerank scoring pipeline labeling training simulator dags tests bench

clean: ## remove the venv, Airflow's state and the tables (./data, ./data-live)
	rm -rf $(VENV) .airflow .airflow-live data data-live .pytest_cache

.PHONY: help setup run test test-fast bench airflow retrain lock lint clean
