# brainit-pl — every target sets up what it needs (a fresh clone needs nothing else).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
DEMO_DIR ?= demo

.PHONY: install test test-slow lint format check demo clean help

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the pinned stack + brainit-pl (editable)

test: $(STAMP)  ## fast CPU test suite (tiny presets, tiny twins)
	$(BIN)/pytest -q

test-slow: $(STAMP)  ## the heavier tests too
	$(BIN)/pytest -q -m "slow and not gpu"

lint: $(STAMP)  ## ruff lint + format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

check: lint test  ## lint + tests

demo: $(STAMP)  ## simulate the demo NSD, prepare the store, train and evaluate on it
	$(BIN)/brainit-pl simulate --out $(DEMO_DIR)/nsd --preset demo --seed 0
	$(BIN)/brainit-pl prepare --nsd-root $(DEMO_DIR)/nsd --out $(DEMO_DIR)/store
	$(BIN)/brainit-pl fit --config configs/demo.yaml --trainer.default_root_dir $(DEMO_DIR)/runs

clean:  ## remove caches (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
