# Two set-up commands for a fresh machine with Python 3.11:
#   make demo   venv + install, then `csp demo` on the embedded default (stdlib, in-process Ray, ./csp-runs/)
#   make test   venv + install, then the whole test suite (real Ray, real S3 server on loopback)
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/csp demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check cli cluster jobs sparsity tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/tokenize.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/prune.py

clean:
	rm -rf $(VENV) csp-runs .pytest_cache
