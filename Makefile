# Two commands do all set-up on a fresh machine:
#   make demo   - a full TAO round on the bundled demo logs with the embedded model (CPU)
#   make test   - the whole test suite, including the real-model end-to-end test
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; set TORCH_SPEC to another build (e.g. a CUDA one) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast ui bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/tao demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

ui: setup
	$(VENV)/bin/tao ui

bench: setup
	$(PY) bench/generation_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
