# The two commands a newcomer runs on a fresh machine (both idempotent):
#   make demo   -- set everything up, then `python -m harness run amazon_desc`
#   make test   -- set everything up, then run the test suite (end-to-end tests marked `slow` left out; ~3.5 min)
#   make test-all -- the same with the slow tests: what CI runs (.ci/run)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all

$(PY):
	$(PYTHON) -m venv $(VENV)

setup: $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m harness fetch-model

demo: setup
	$(PY) -m harness run amazon_desc

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q
