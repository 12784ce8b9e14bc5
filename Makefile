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

.PHONY: setup browser postgres demo lint test test-full test-fast test-ui ui serve bench bench-quality bench-incremental bench-ingest bench-flywheel bench-rounds bench-compute bench-recipe bench-threads bench-serve gpu-wheels gpu-check clean

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

# Idempotent: installs Debian's PostgreSQL server only when initdb is missing. The tests start their own throwaway
# server from it (tests/postgres.py: initdb into a temporary folder, a unix socket only).
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing Debian postgresql for the Postgres instance tests"; \
	  $(APT_GET) install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 || \
	  { $(APT_GET) update -qq && $(APT_GET) install -y -qq --no-install-recommends postgresql >/dev/null; }; }

demo: setup
	$(VENV)/bin/tao demo

# The architecture (import-linter: layers, no dagster in the domain, no cycles) and the style (ruff).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The tests run in parallel (pytest-xdist): one worker per CPU this run may use, each module on one worker,
# the long ones first (tests/conftest.py, pyproject.toml's addopts); the slowest 25 are listed at the end.
# Property-based tests run a sample of cases; `make test-full` runs each one's full size (TAO_FUZZ=full).
PYTEST := $(PY) -m pytest -n auto --durations=25

test: setup browser postgres lint
	$(PYTEST)

test-full: setup browser postgres lint
	TAO_FUZZ=full $(PYTEST)

test-fast: setup postgres lint
	$(PYTEST) -m "not slow and not ui"

test-ui: setup browser
	$(PYTEST) -m ui

ui: setup
	$(VENV)/bin/tao ui

serve: setup
	$(VENV)/bin/tao serve

# Benchmarks print their figures (README "Results" says what each measured); none is a test.
bench: setup            # the three speed ratios side by side: generation, DPO step, the demo round before vs now (~26 min)
	$(PY) bench/throughput.py

bench-quality: setup    # base vs TAO vs control vs labeled SFT, two rounds (~16 min on 2 CPU cores)
	$(PY) bench/quality.py

bench-incremental: setup  # a round, then a rerun after 10% new prompts
	$(PY) bench/incremental.py

bench-ingest: setup     # 250k and 1M log rows: rows/s and peak memory, streaming vs the whole file in memory; a burst of files through the daemon
	$(PY) bench/ingest_million.py --whole
	$(PY) bench/ingest_burst.py

bench-flywheel: setup   # serve -> logs -> sensors -> round -> shadow -> canary -> promotion -> swap, and a worse challenger rolled back; unattended, under faults (~1 h)
	$(PY) bench/flywheel.py

bench-rounds: setup     # five rounds on the demo logs arriving in fifths, all replayed, the chosen recipe, control and labeled arms (~19 min)
	$(PY) bench/rounds.py --rounds 5 --replay 1 --recipe demo

bench-compute: setup    # one round at each compute_scale (0.25, 0.5, 1, 2) and seed (0, 1): accuracy with intervals, the curve as a PNG
	$(PY) bench/compute.py --seeds 0 1 --set data.max_prompts=96

bench-recipe: setup     # DPO recipes (fp32, learning rate, beta, epochs) on one round's pairs, each vs the default (~35 min)
	$(PY) bench/recipe.py

bench-threads: setup    # sampling and DPO steps with 0-2 busy processes (nice 0 and 19) per torch thread setting (~1 hour)
	$(PY) bench/threads.py --json bench/results/threads.json

bench-serve: setup      # tao serve at 1, 8, 32 clients: batched vs one at a time, with and without a hostile client
	$(PY) bench/serve_load.py

# The GPU check (bench/gpu_check.py) on an offline CUDA machine whose Python 3.12 already has torch,
# transformers, peft, accelerate and the rest of bench/gpu_image_packages.txt. `make gpu-wheels`, here, puts
# the wheels it needs beyond those (the versions of this venv) and the embedded model's tokenizer into
# $(WHEELS)/, and fails if they and the working tree would not travel in 64 MiB; `make gpu-check`, there,
# installs them into $(GPU_SITE) with no network and runs the check. tests/test_gpu_check.py checks the list.
WHEELS := .whl
GPU_SITE ?= /tmp/site
GPU_CHECK_JSON ?= $(or $(OUT),.)/gpu_check.json
GPU_WHEELS := trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 duckdb==2.0.1 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 croniter==7.0.0
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64
TAO_HOME ?= $(HOME)/.tao
EMBEDDED_DIR = $(TAO_HOME)/models/base/SmolLM2-135M-Instruct
TRAVEL_LIMIT_MB := 64

gpu-wheels: setup
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)/tokenizer
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(addprefix --platform ,$(GPU_PLATFORMS)) -d $(WHEELS) $(GPU_WHEELS)
	test -f $(EMBEDDED_DIR)/tokenizer.json || TAO_HOME=$(TAO_HOME) $(VENV)/bin/tao bootstrap
	cp $(EMBEDDED_DIR)/tokenizer.json $(EMBEDDED_DIR)/tokenizer_config.json $(EMBEDDED_DIR)/chat_template.jinja \
	  $(WHEELS)/tokenizer/
	@tree=$$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1); \
	  wheels=$$(du -sb $(WHEELS) | cut -f1); total=$$(( (tree + wheels) / 1048576 )); \
	  echo "$(WHEELS): $$(ls $(WHEELS)/*.whl | wc -l) wheels + tokenizer, $$((wheels / 1048576)) MiB;" \
	    "with the working tree $$total MiB of $(TRAVEL_LIMIT_MB)"; \
	  test $$total -lt $(TRAVEL_LIMIT_MB) || { echo "ERROR: over $(TRAVEL_LIMIT_MB) MiB: it will not travel"; exit 1; }

gpu-check:
	$(PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	  --target $(GPU_SITE) $(WHEELS)/*.whl
	PYTHONPATH=$(GPU_SITE) PYTHONUNBUFFERED=1 $(PYTHON) bench/gpu_check.py --json $(GPU_CHECK_JSON) $(if $(PHASES),--phases $(PHASES))

clean:
	rm -rf $(VENV) .pytest_cache
