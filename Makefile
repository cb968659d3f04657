# Set-up and checks. `make test` works on a fresh machine: it installs what is missing, then tests.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

# Exactly these: a looser range downloads a multi-GB CUDA build (see README).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install test lint serve bench

install:
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH_PINS)
	@# Reinstall unless mm_runtime is this checkout (CI clones elsewhere on the same machine).
	@# The imports also check that every dependency is there (a checkout may add one).
	@$(PYTHON) -c "import os, sys, mm_runtime, blake3, pytest, hypothesis, ruff, fastapi, uvicorn, \
		prometheus_client, openai, schemathesis; \
		sys.exit(os.path.dirname(mm_runtime.__file__) != os.getcwd())" 2>/dev/null \
		|| $(PIP) install -q -e ".[test]"

test: install
	$(PYTHON) -m pytest -q -x

# The server on the tiny demo model (random answers) unless ARGS names one: make serve ARGS="--model DIR"
serve: install
	$(PYTHON) -m mm_runtime.cli serve $(ARGS)

lint:
	ruff format --check .
	ruff check .

bench: install
	$(PYTHON) bench/offline.py
