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

.PHONY: venv broker test test-faults test-all lint data demo benchmarks benchmark-peer clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# A broker at AMQP_URL, started locally (rabbitmq-server or docker compose) when none answers.
broker: venv
	$(PY) -m broker.ensure

data: venv
	$(VENV)/bin/mqfed-worker data synth --out $(DATA_DIR)

test: broker
	$(PY) -m pytest -q -m "not slow and not faults"

# The fault suite (tests/faults, docs/faults.md): real processes, real signals, the real broker.
test-faults: broker
	$(PY) -m pytest -q -m faults tests/faults

# ruff (rules in pyproject.toml) over everything; mypy (strict optional, typed defs) over the pure packages.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test-all: broker
	$(PY) -m pytest -q

demo: broker
	$(VENV)/bin/mqfed-coordinator demo --data $(DATA_DIR)

# The figures in the README (each prints a table and ends with one JSON line).
benchmarks: broker data
	$(PY) tests/benchmarks/centralized.py --data $(DATA_DIR)
	$(PY) tests/benchmarks/augmentation.py --data $(DATA_DIR)
	$(PY) tests/benchmarks/async_vs_sync.py
	$(PY) tests/benchmarks/compression.py
	$(PY) tests/benchmarks/transport.py
	$(PY) tests/benchmarks/worker_throughput.py
	$(PY) tests/benchmarks/coordinator_overhead.py
	$(PY) tests/benchmarks/scale.py
	$(PY) tests/benchmarks/downlink.py

# mqfed beside Flower (tests/benchmarks/peer_flower.py; 26-37 min per repeat, 80-110 min for the 3 on 2 cores): flwr only for this.
benchmark-peer: broker data
	$(PY) -m pip install -q -e ".[dev,peer]"
	$(PY) tests/benchmarks/peer_flower.py

clean:
	rm -rf $(VENV) .cache .pytest_cache runs
