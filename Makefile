# The two commands a newcomer runs on a fresh machine (both idempotent):
#   make demo   -- set everything up, then `python -m harness run amazon_desc`
#   make test   -- set everything up, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test

$(PY):
	$(PYTHON) -m venv $(VENV)

setup: $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m harness fetch-model

demo: setup
	$(PY) -m harness run amazon_desc

test: setup
	$(PY) -m pytest -q
