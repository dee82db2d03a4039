# One-command set-up: `make demo` (build the bundled recipe, then generate) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LLMBUILD := $(VENV)/bin/llmbuild
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint venv clean

venv: $(STAMP)

# torch is installed first and pinned in the same command as everything else, so that no
# dependency can make pip fetch a multi-GB CUDA build instead of the local CPU wheel.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' torch==2.13.0
	touch $(STAMP)

# models/demo is committed: a small Llama trained by tools/train_demo_model.py (see models/demo/README.md)
demo: $(STAMP)
	$(LLMBUILD) compile recipes/demo.yaml -o engines/demo
	$(LLMBUILD) run engines/demo --prompt "A list is" --max-tokens 48 --temperature 0.7 --top-p 0.9 --seed 1

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check llmbuild tests tools bench
	$(VENV)/bin/mypy llmbuild

clean:
	rm -rf engines checkpoints build .pytest_cache
