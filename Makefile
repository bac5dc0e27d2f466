# One command to set up and run each job; every target creates .venv if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.silorec-installed
DATA   := data
DEMO_ROUNDS ?= 10

.PHONY: install demo test test-all lint clean

install: $(STAMP)

# torch first: on CPU-only machines the pinned CPU wheel must win over a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# A small but real federation in federation privacy mode: MovieLens-100k, 10 region merchants (+1 for
# non-digit ZIPs), the bundled MiniLM, user-level DP at epsilon 8 over the federation; fewer DP-SGD
# steps than the benchmark (docs/results.md), validated after the last.
demo: install
	$(BIN)/silorec-sim fetch-data movielens-100k --out $(DATA)/ml-100k
	$(BIN)/silorec-sim partition $(DATA)/ml-100k --merchants 10 --scheme region --out $(DATA)/silos --force
	$(BIN)/silorec-sim run --data $(DATA)/ml-100k --merchants 10 --scheme region --privacy federation \
		--rounds $(DEMO_ROUNDS) --eval-every $(DEMO_ROUNDS) --epsilon 8 --delta 1e-4 --out runs/demo --force

test: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-all: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
