# One command per task; CI (.ci/run) calls the same targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-compat lint mypy format bench bench-scale bench-fairness bench-bombs config all clean

# Compatibility (docs/operations.md, "Supported Prefect versions"): the oldest supported
# Prefect, in a venv of its own with the dependency versions of its time. The venv is
# cached outside the checkout, keyed by the constraints file, and built from scratch when
# absent: into a temporary directory of its own beside the target, renamed into place only
# once complete. Two builds at once each build their own; the first rename wins, and the
# other keeps the venv it finds and drops its own.
COMPAT_PREFECT := 3.4
COMPAT_CACHE   ?= $(HOME)/.cache/flowsubmit-compat
COMPAT_KEY      = $(shell cat compat/constraints-$(COMPAT_PREFECT).txt compat/requirements.txt | sha256sum | cut -c1-12)
COMPAT_VENV     = $(COMPAT_CACHE)/prefect-$(COMPAT_PREFECT)-$(COMPAT_KEY)
COMPAT_TESTS    = $(shell grep -v '^\#' compat/subset.txt)
COMPAT_PATH     = PYTHONPATH=$(CURDIR)/daemon:$(CURDIR)

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

$(COMPAT_VENV)/.complete:
	mkdir -p $(COMPAT_CACHE)
	set -e; tmp=$$(mktemp -d $(COMPAT_VENV).tmp.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp"; \
	"$$tmp/bin/python" -m pip install --quiet --upgrade pip; \
	"$$tmp/bin/python" -m pip install --quiet \
		-c compat/constraints-$(COMPAT_PREFECT).txt -r compat/requirements.txt; \
	touch "$$tmp/.complete"; \
	if mv -T "$$tmp" $(COMPAT_VENV) 2>/dev/null; then exit 0; fi; \
	if [ -e $(COMPAT_VENV)/.complete ]; then echo "$(COMPAT_VENV): built meanwhile by another build; keeping it"; exit 0; fi; \
	echo "$(COMPAT_VENV) exists but is incomplete: remove it" >&2; exit 1

# The subset (compat/subset.txt) three times, one row of the compatibility table each:
# old server with this venv's client, old server and old client, this venv's server with
# the old client.
test-compat: $(STAMP) $(COMPAT_VENV)/.complete
	$(COMPAT_PATH) FLOWSUBMIT_TEST_SERVER_PYTHON=$(COMPAT_VENV)/bin/python \
		$(BIN)/python -m pytest -p no:cacheprovider -n 2 --dist loadgroup $(COMPAT_TESTS)
	$(COMPAT_PATH) $(COMPAT_VENV)/bin/python -m pytest -p no:cacheprovider -n 2 --dist loadgroup $(COMPAT_TESTS)
	$(COMPAT_PATH) FLOWSUBMIT_TEST_SERVER_PYTHON=$(CURDIR)/$(BIN)/python \
		$(COMPAT_VENV)/bin/python -m pytest -p no:cacheprovider -n 2 --dist loadgroup $(COMPAT_TESTS)

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
