# Two commands do everything on a fresh machine:
#   make demo   -- create .venv, install, run the demo on the embedded digits data
#   make test   -- create .venv, install, run lint, type checks and the whole test suite
#
#   make docs   -- the documentation site (Sphinx, executed gallery) into docs/_build/html,
#                  warnings as errors, offline; DOCS_GALLERY=0 skips running the examples
#
# TORCH_SPEC selects the torch build.  The default is the CPU build
# (torch==2.13.0); with a GPU use e.g. `make demo TORCH_SPEC=torch` (PyPI's
# default CUDA build) or any pip requirement of your choice.
#
#   make test-newest -- the same lint, type checks and tests in .venv-newest on
#                       the newest torch release (requirements/newest-torch.txt);
#                       CI runs both `make test` and `make test-newest`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
NEWEST_TORCH_SPEC ?= -r requirements/newest-torch.txt
NEWEST_VENV ?= .venv-newest
RESULTS ?= results
HYPOTHESIS_PROFILE ?= ci
PYTEST_WORKERS ?= 2
BIN := $(VENV)/bin
# No pip cache: the newest torch is the CUDA build from PyPI (about 4 GB of wheels with its
# nvidia-* dependencies), which a cache would keep a second copy of on disk; a CI run once
# failed with "No space left on device" while installing it.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --no-cache-dir
STAMP := $(VENV)/.installed
PACKAGES := spectral curvops nets

.PHONY: setup demo test test-newest lint typecheck pytest docs clean

$(STAMP): setup.cfg pyproject.toml requirements/test-oracles.txt requirements/newest-torch.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(foreach spec,$(TORCH_SPEC),"$(spec)")
	$(PIP_INSTALL) -e ".[test]"
	$(PIP_INSTALL) --no-deps -r requirements/test-oracles.txt
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

DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): $(STAMP)
	$(PIP_INSTALL) -e ".[docs]"
	touch $(DOCS_STAMP)

# The documentation site: API reference from the packages' __all__, the gallery
# executed from examples/, the CLI reference from nets.cli.build_parser().
docs: $(DOCS_STAMP)
	MPLBACKEND=Agg OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	$(BIN)/python -m sphinx -b html -W --keep-going -j 1 docs docs/_build/html

# The whole `make test` again in its own virtual environment on the newest torch.
test-newest:
	$(MAKE) test VENV=$(NEWEST_VENV) TORCH_SPEC="$(NEWEST_TORCH_SPEC)"

clean:
	rm -rf $(VENV) $(NEWEST_VENV) build docs/_build docs/api docs/auto_examples *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
