# mqfed: `make demo` and `make test` do the whole set-up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: on a machine without an NVIDIA driver, pin the CPU build that pip finds locally (2.13.0),
# so no range ever pulls gigabytes of CUDA wheels. GPU nodes: TORCH_SPEC="torch" (see README).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
DATA_DIR ?= .cache/mqfed/synth-ks
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: venv test test-all data demo benchmark-centralized clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

data: venv
	$(VENV)/bin/mqfed-worker data synth --out $(DATA_DIR)

test: venv
	$(PY) -m pytest -q -m "not slow"

test-all: venv
	$(PY) -m pytest -q

demo: data
	$(PY) tests/benchmarks/centralized.py --data $(DATA_DIR)

benchmark-centralized: data
	$(PY) tests/benchmarks/centralized.py --data $(DATA_DIR)

clean:
	rm -rf $(VENV) .cache .pytest_cache
