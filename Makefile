# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing, install torch==2.13.0 first (the CPU wheel; an unpinned torch
# would pull a multi-GB CUDA build), then ctflow with its test extras. Idempotent: the install
# step reruns only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ctflow-installed
TORCH_VERSION := 2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install clean-venv

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ctflow demo

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
