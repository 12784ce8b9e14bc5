# Two commands do all set-up on a fresh machine:
#   make demo   - a full TAO round on the bundled demo logs with the embedded model (CPU)
#   make test   - the whole test suite, including the real-model end-to-end test
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; set TORCH_SPEC to another build (e.g. a CUDA one) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The browser the UI test (tests/test_ui_browser.py) drives through Playwright: Debian's chromium
# package, not `playwright install` (which downloads browsers from a CDN).
CHROMIUM ?= /usr/bin/chromium
APT_GET := DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo )apt-get

.PHONY: setup browser demo lint test test-fast test-ui ui serve bench bench-quality bench-incremental bench-ingest bench-flywheel clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Idempotent: installs chromium only when $(CHROMIUM) is missing (apt-get update only if needed).
browser:
	@test -x $(CHROMIUM) || { \
	  echo "installing Debian chromium for the UI test"; \
	  $(APT_GET) install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	  { $(APT_GET) update -qq && $(APT_GET) install -y -qq --no-install-recommends chromium >/dev/null; }; \
	  test -x $(CHROMIUM) || { echo "chromium is not at $(CHROMIUM)"; exit 1; }; }

demo: setup
	$(VENV)/bin/tao demo

# The architecture (import-linter: layers, no dagster in the domain, no cycles) and the style (ruff).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: setup browser lint
	$(PY) -m pytest

test-fast: setup lint
	$(PY) -m pytest -m "not slow and not ui"

test-ui: setup browser
	$(PY) -m pytest -m ui

ui: setup
	$(VENV)/bin/tao ui

serve: setup
	$(VENV)/bin/tao serve

# Benchmarks print their figures (README "Results" says what each measured); none is a test.
bench: setup            # generation vs a naive loop, then a default round: time and memory per stage, DPO steps/s
	$(PY) bench/throughput.py

bench-quality: setup    # base vs TAO vs control, two rounds (~35 min on 2 CPU cores)
	$(PY) bench/quality.py

bench-incremental: setup  # a round, then a rerun after 10% new prompts
	$(PY) bench/incremental.py

bench-ingest: setup     # 250k and 1M log rows: rows/s and peak memory, streaming vs the whole file in memory
	$(PY) bench/ingest_million.py --whole

bench-flywheel: setup   # serve -> logs -> sensors -> round -> promotion -> swap, unattended, under faults (~15 min)
	$(PY) bench/flywheel.py

clean:
	rm -rf $(VENV) .pytest_cache
