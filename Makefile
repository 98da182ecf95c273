# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv on first use; torch is pinned to the CPU build, the project keeps a range.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0

.PHONY: setup test lint demo bench clean

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
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/recursify demo --out runs/demo --minutes 20

bench: setup
	$(PY) benchmarks/convert_speed.py

clean:
	rm -rf $(VENV) runs
