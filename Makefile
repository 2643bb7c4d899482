# hfoptim developer commands. Everything runs in a virtual environment at $(VENV).
# TORCH_SPEC picks the torch install: unpinned for users; CI and CPU-only machines may pin it,
# e.g. `TORCH_SPEC=torch==2.13.0 make test` (a local CPU wheel, no CUDA download).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch
PYTEST_ARGS ?=
# `make test` runs the suite in TEST_WORKERS processes (pytest-xdist; idle workers take tests
# queued for busy ones), one torch thread each: most tests are compilation and small tensors,
# which a second thread does not speed up (the multi-process tests set their own threads).
TEST_WORKERS ?= 2

.PHONY: setup test test-fast demo bench lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m hfoptim.app.demo

bench: setup
	$(PY) -m hfoptim.app.bench

lint: setup
	$(VENV)/bin/ruff check hfoptim tests benchmarks recipes
	$(VENV)/bin/ruff format --check hfoptim tests benchmarks recipes

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs
