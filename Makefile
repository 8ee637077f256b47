# Two commands do everything on a fresh machine:
#   make demo   -- create .venv, install, run the demo on the embedded digits data
#   make test   -- create .venv, install, run lint, type checks and the whole test suite
#
# TORCH_SPEC selects the torch build.  The default is the CPU build
# (torch==2.13.0); with a GPU use e.g. `make demo TORCH_SPEC=torch` (PyPI's
# default CUDA build) or any pip requirement of your choice.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
RESULTS ?= results
HYPOTHESIS_PROFILE ?= ci
PYTEST_WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := spectral curvops nets

.PHONY: setup demo test lint typecheck pytest clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/curvature demo --out $(RESULTS)

lint: $(STAMP)
	$(BIN)/ruff check $(PACKAGES) tests examples benchmarks
	$(BIN)/ruff format --check $(PACKAGES) tests examples benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# One BLAS/OpenMP thread per pytest worker: the tests use small matrices, and
# oversubscribed threads cost far more than they save on a 2-core machine.
pytest: $(STAMP)
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) MPLBACKEND=Agg OMP_NUM_THREADS=1 \
	OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --durations=15

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
