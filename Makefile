# The README's two commands call these targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export OMP_NUM_THREADS ?= 2

.PHONY: setup run repro test lint clean-outputs

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Install the package with test and scale-out extras; then prove torch + torchvision import as a pair.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev,scale]"
	$(BIN)/python -c "import torch, torchvision, torchvision.ops; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

setup: $(VENV)/.installed

# Command 1: the whole pipeline on the embedded demo dataset (smoke profile unless params.yaml says otherwise).
run: setup repro

repro:
	dvc repro
	@echo "results table: $(abspath reports/results.md)"

# Command 2: the tests, one worker per CPU core (pytest-xdist), each test module on one worker (its
# fixtures are built once) and one torch thread per worker.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --dist loadfile

lint:
	$(BIN)/python -m ruff check src stages pipelines tests || true
