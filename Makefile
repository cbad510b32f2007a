# agreelens: `make run` reproduces the study on the default profile, `make test` runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export PREFECT_HOME ?= $(CURDIR)/.prefect
export BENTOML_HOME ?= $(CURDIR)/.bentoml

.PHONY: run test install data repro report stages bench clean services services-stop container-test container-test-tiny

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@bad=$$($(PY) -m pip list 2>/dev/null | grep -iE '^(nvidia-|triton)' | grep -iv '^nvidia-ml-py'); \
	if [ -n "$$bad" ]; then echo "error: CUDA wheels were installed (torch must stay CPU): $$bad"; exit 1; fi
	touch $@

install: $(VENV)/.installed

# data/ from the committed compressed corpora, when no DVC remote has it
data: install
	$(BIN)/agreelens data
	@$(BIN)/dvc status data.dvc

# the pipeline of agreelens/stages.py; its last stage registers both models (metrics/register_<model>.json)
repro: data
	@if [ -n "$(PROFILE)" ]; then $(BIN)/agreelens profile $(PROFILE); fi
	$(BIN)/dvc repro

run: repro
	$(BIN)/agreelens report

report: install
	$(BIN)/agreelens report

# dvc.yaml from the stage registry (agreelens/stages.py); `agreelens stages` lists the stages in order
stages: install
	$(BIN)/agreelens stages --emit

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/train_throughput.py

# MLflow (http://127.0.0.1:5000) and Prefect (http://127.0.0.1:4200) servers with their UIs; PIDs, logs: .services/
services: install
	bash scripts/services.sh start

services-stop:
	bash scripts/services.sh stop

# service and worker images (Dockerfile) on a local debootstrap base with buildah, run on loopback and checked;
# timings at the end (CONTAINER_TEST_REGISTRY=1: also pull the model from a throwaway MLflow registry); see
# scripts/container-test.sh. container-test serves the checkout's models/large (`make run` first);
# container-test-tiny a tiny-profile model trained in seconds in a scratch folder (what CI runs as root)
container-test:
	bash scripts/container-test.sh

container-test-tiny: install
	CONTAINER_MODEL=tiny bash scripts/container-test.sh

clean:
	rm -rf prepared models checkpoints metrics plots reports/figures
