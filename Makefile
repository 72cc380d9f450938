# Set-up and entry points. `make train` and `make test` work on a fresh machine:
# they create .venv, install torch (CPU build here; TORCH_SPEC to change) and the package.
# --no-compile: pip byte-compiled every installed module (~1 min on 2 cores); Python compiles the ones
# imported on first import instead.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?= -n 2

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install train test bench clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-compile -e ".[dev]"
	$(PY) -c "from router_train.kernel import fused; fused.available()"  # compile the fused kernel once (warns if no C compiler)
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m router_train.train --config $(CONFIG) $(TRAIN_ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/kernel.py

clean-venv:
	rm -rf $(VENV)
