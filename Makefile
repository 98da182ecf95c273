# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite, what CI runs).
# Both create .venv on first use; torch is pinned to the CPU build, the project keeps a range.
# `make check` is the fast tier for development: lint + every test not marked slow.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
# where the time goes: the 15 slowest tests after every run
PYTEST ?= $(PY) -m pytest --durations=15

.PHONY: setup test check lint demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy

test: lint
	$(PYTEST)

# One intra-op thread: the fast tier runs tiny models only, which gain nothing from threads, and on a
# shared CPU OpenMP's spinning made the tier several times slower (217 vs 45 CPU-seconds measured).
check: lint
	OMP_NUM_THREADS=1 $(PYTEST) -m "not slow"

demo: setup
	$(VENV)/bin/recursify demo --out runs/demo --minutes 20

bench: setup
	$(PY) benchmarks/convert_speed.py

clean:
	rm -rf $(VENV) runs
