# distill: make targets for every stage, the tests, lint and benchmarks.
RECIPE ?= recipes/demo.yaml
VENV   ?= .venv
PY     := $(VENV)/bin/python
DISTILL := $(VENV)/bin/distill
SET    ?=
SETARGS := $(foreach s,$(SET),--set $(s))

.PHONY: setup demo test test-all lint format bench clean teachers generate filter train eval run

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
