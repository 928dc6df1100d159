# Quick start: `make demo` and `make test` each set up .venv on a fresh clone, then run.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[llm,serve,genrec,test]"
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(BIN)/recalign run recipes/demo.yaml

test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# The contributors' quick loop: tests marked `fast` (tiny models, synthetic data; about a minute here).
test-fast: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "fast and not slow"

clean:
	rm -rf runs .pytest_cache
