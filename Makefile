# sdft: `make demo` runs the whole pipeline once on the embedded default; `make test` runs the test suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. On a GPU machine override it, e.g.
# make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# Everything the stack needs offline, in one place (pipeline/env.py sets the same for Python entry points).
export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test test-slow lint format serve ui clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	# Only for CLIP's BPE merges file (the real tokenizer, built offline); --no-deps keeps its torchvision out.
	$(BIN)/pip install -q --no-deps 'open_clip_torch>=2.24,<4'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/sdft init
	$(BIN)/sdft run
	@echo
	@echo "Next: run 'source $(VENV)/bin/activate' in your shell: it puts sdft, dvc, mlflow and prefect on PATH, as the"
	@echo "README's commands assume (sdft models, dvc repro, dvc metrics show, ...). make ui / make serve work without it."

# The README's test command: unit tests, the data/train/evaluate tests and the end-to-end retrain (about 9 minutes
# on 2 cores). test-slow adds the service-level tests: real Prefect and MLflow servers, basic auth, kill-and-resume,
# two-process DDP and FSDP, torch.compile (about 14 minutes more). CI runs both.
test: install
	$(BIN)/pytest -q -m "not slow"

test-slow: install
	$(BIN)/pytest -q -m slow

PY_DIRS := pipeline flows tests bench

lint: install
	$(BIN)/ruff check $(PY_DIRS) && $(BIN)/ruff format --check $(PY_DIRS)

format: install
	$(BIN)/ruff check --fix $(PY_DIRS) && $(BIN)/ruff format $(PY_DIRS)

ui: install
	$$($(BIN)/sdft ui)

# The scheduled retrain (prefect.yaml), served from here; a local Prefect server on 127.0.0.1 unless PREFECT_API_URL
# points at one (docs/scheduling.md).
serve: install
	$(BIN)/sdft serve

clean:
	rm -rf data/prepared models/adapter reports .sdft mlflow/mlflow.db mlflow/artifacts
