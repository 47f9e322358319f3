# One command per task; CI (.ci/run) calls the same targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint mypy format bench bench-scale bench-fairness bench-bombs config all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flowsubmit demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench

format: $(STAMP)
	$(BIN)/ruff format daemon tests bench
	$(BIN)/ruff check --fix daemon tests bench

mypy: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/tracking.py

bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py 10000
	$(BIN)/python bench/scale.py 10000 --topology

bench-fairness: $(STAMP)
	$(BIN)/python bench/fairness.py

bench-bombs: $(STAMP)
	$(BIN)/python bench/key_bombs.py 10

config: $(STAMP)
	$(BIN)/python -c "import sys; from flowsubmit.settings import example_toml; sys.stdout.write(example_toml())" > config/flowsubmit.toml
	$(BIN)/flowsubmit schema > config/job.schema.json

all: lint mypy test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
