# The two commands of the README. Both create the virtual environment .venv/ when missing.
#   make train   set up, then run the default job (ViT on the bundled digits)
#   make test    set up (with the test and interop extras), then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: train test setup

train: $(VENV)/.base
	$(PY) run.py

test: $(VENV)/.test
	$(PY) -m pytest -q -n 2

setup: $(VENV)/.base

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# torch, timm and transformers for the cross-framework parity tests (a large download).
$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install --quiet -e ".[test,interop]"
	touch $@
