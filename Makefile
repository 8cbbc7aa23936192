# `make demo` and `make test` work on a fresh machine: each creates .venv with pip if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint format setup clean

$(BIN)/blipctl: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-cache-dir -e ".[dev]"
	command -v java >/dev/null || echo "note: java not found; METEOR is skipped (apt-get install default-jre-headless)"
	touch $(BIN)/blipctl

setup: $(BIN)/blipctl

demo: setup
	$(BIN)/blipctl run recipes/demo.toml

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
