# resnet-flax: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
# Huge pages for malloc, so glibc keeps XLA:CPU's per-step buffers instead of faulting them in
# again every step (docs/performance.md); a glibc without the tunable ignores it.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
# Tests in one worker process per core (pytest-xdist), at most 4: most are single-threaded
# compiles and subprocesses. PARALLEL= runs them in one process.
PARALLEL ?= -n auto --maxprocesses=4

.PHONY: help demo test test-all bench lint format venv clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The demo needs the project alone; tests and benchmarks add the [dev] extra (TFDS, pytest, ruff).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(DEV_STAMP)

venv: $(STAMP)  ## Create .venv and install the project (done by demo and test when missing)

demo: $(STAMP)  ## Run the default digits degradation sweep and draw its figures and report
	$(PY) -m experiments.demo

test: $(DEV_STAMP)  ## Lint and run the fast tests
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -m "not slow" -q $(PARALLEL)

test-all: $(DEV_STAMP)  ## Lint and run every test, the slow ones too
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q $(PARALLEL)

bench: $(DEV_STAMP)  ## CPU/GPU benchmark of plain and residual 20/56/110 (+ PyTorch if installed, rounds alternating)
	$(PY) -m benchmarks.step_time --models plain residual --depths 20 56 110 --repeats 1 --rounds 3 \
		$(if $(shell $(PY) -c "import torch" 2>/dev/null && echo y),--torch) --name plain_residual_20_56_110

lint: $(DEV_STAMP)  ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEV_STAMP)  ## ruff format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:  ## Remove caches (not results)
	rm -rf .pytest_cache .ruff_cache .jax_cache
