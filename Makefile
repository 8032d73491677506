# The two commands of the README. Both create the virtual environment .venv/ when missing.
#   make train   set up, then run the default job (ViT on the bundled digits)
#   make test    set up, then run the test suite (CPU, 8 simulated devices)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: train test setup

train: $(VENV)/.installed
	$(PY) run.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@
