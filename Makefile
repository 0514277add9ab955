# brainit-pl — every target sets up what it needs (a fresh clone needs nothing else).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
DEMO_DIR ?= demo

.PHONY: install test test-slow lint format check demo demo-baseline transfer-1h data-efficiency clean help

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the pinned stack + brainit-pl (editable)

# One torch thread per process: the tests run tiny models (thread sync costs more than it saves) and the DDP
# tests start two processes on two cores.
test: $(STAMP)  ## fast CPU test suite (tiny presets, tiny twins)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q

test-slow: $(STAMP)  ## the heavier tests too
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -m "slow and not gpu"

lint: $(STAMP)  ## ruff lint + format check
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/ruff format --check src tests benchmarks docs

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests benchmarks docs
	$(BIN)/ruff format src tests benchmarks docs

check: lint test  ## lint + tests

demo: $(STAMP) $(DEMO_DIR)/store/manifest.json  ## the whole method on the simulated demo NSD → runs/demo/report/
	$(BIN)/brainit-pl demo --store $(DEMO_DIR)/store --out runs/demo

# Holds out simulated subject 4: base models of subjects 1-3, then subject 4 from 1 h by transfer, from scratch
# and with all its data (make demo's models, from runs/demo when it has them).
transfer-1h: $(STAMP) $(DEMO_DIR)/store/manifest.json  ## a new subject from 1 h of data → runs/transfer-1h/report/
	$(BIN)/brainit-pl transfer-demo --store $(DEMO_DIR)/store --subject 4 --hours 1 --out runs/transfer-1h

data-efficiency: $(STAMP) $(DEMO_DIR)/store/manifest.json  ## feature prediction vs hours (15 min .. all) → runs/data-efficiency/
	$(BIN)/python benchmarks/data_efficiency.py --store $(DEMO_DIR)/store --subject 4 --base runs/transfer-1h \
		--out runs/data-efficiency --transfer-epochs 10  # the settings of the table in benchmarks/RESULTS.md

demo-baseline: $(STAMP) $(DEMO_DIR)/store/manifest.json  ## the linear baseline decoder only (~1.5 min)
	rm -rf $(DEMO_DIR)/runs/fit $(DEMO_DIR)/runs/test
	$(BIN)/brainit-pl fit --config configs/demo.yaml --data.store $(DEMO_DIR)/store \
		--trainer.default_root_dir $(DEMO_DIR)/runs/fit
	$(BIN)/brainit-pl test --config configs/demo.yaml --data.store $(DEMO_DIR)/store \
		--trainer.default_root_dir $(DEMO_DIR)/runs/test \
		--ckpt_path $(DEMO_DIR)/runs/fit/lightning_logs/version_0/checkpoints/last.ckpt
	@echo "demo-baseline: report and reconstruction grids in $(DEMO_DIR)/runs/test/lightning_logs/version_0/test/;" \
		"pictures of the simulated brain in $(DEMO_DIR)/nsd/simulation/preview_*.png"

$(DEMO_DIR)/nsd/simulation/truth.json: | $(STAMP)
	$(BIN)/brainit-pl simulate --out $(DEMO_DIR)/nsd --preset demo --seed 0 --overwrite

$(DEMO_DIR)/store/manifest.json: $(DEMO_DIR)/nsd/simulation/truth.json
	$(BIN)/brainit-pl prepare --nsd-root $(DEMO_DIR)/nsd --out $(DEMO_DIR)/store --overwrite

clean:  ## remove caches (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
