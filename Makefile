# distill: make targets for every stage, the tests, lint and benchmarks.
RECIPE ?= recipes/demo.yaml
VENV   ?= .venv
PY     := $(VENV)/bin/python
DISTILL := $(VENV)/bin/distill
SET    ?=
SETARGS := $(foreach s,$(SET),--set $(s))

.PHONY: setup demo test test-all test-floors lint format bench clean teachers generate filter train eval run

# Idempotent: the stamp is newer than pyproject.toml once everything is installed.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# exactly this torch first (a CPU build on local disk); anything else pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(DISTILL) run recipes/demo.yaml $(SETARGS)

run: setup
	$(DISTILL) run $(RECIPE) $(SETARGS)

teachers generate filter train eval: setup
	$(DISTILL) $@ $(RECIPE) $(SETARGS)

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

# The suite at the dependency floors (README, "Versions"): every direct dependency at the
# lowest release pyproject.toml allows (uv's lowest-direct resolution), in .venv-floors,
# beside the same torch as .venv; TORCH=2.8.0 puts torch's floor there instead (PyPI's
# build of it, with its CUDA libraries: ~5 GB; docs/versions.md).
TORCH ?= $$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')
test-floors: setup
	$(PY) -m pip install -q uv
	test -x .venv-floors/bin/python || $(VENV)/bin/uv venv -q --seed -p $(PY) .venv-floors
	.venv-floors/bin/python -m pip install -q torch==$(TORCH)
	$(VENV)/bin/uv pip install -q -p .venv-floors/bin/python --resolution lowest-direct -e '.[dev]'
	.venv-floors/bin/python -m pytest -m "not slow" -q

lint: setup
	$(VENV)/bin/ruff check distill teachers tests bench
	$(VENV)/bin/ruff format --check distill teachers tests bench

format: setup
	$(VENV)/bin/ruff check --fix distill teachers tests bench
	$(VENV)/bin/ruff format distill teachers tests bench

bench: setup
	$(PY) -m pip install -q -e '.[dev,bench]'
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf data/*/ .pytest_cache .ruff_cache build *.egg-info
