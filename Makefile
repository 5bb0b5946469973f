PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
BSTAMP := $(VENV)/.installed-bench

.PHONY: test bench lint format clean examples

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

$(BSTAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[test,bench]"
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check kldiv tests bench examples
	$(BIN)/ruff format --check kldiv tests bench examples
	$(BIN)/pyright kldiv

format: $(STAMP)
	$(BIN)/ruff format kldiv tests bench examples
	$(BIN)/ruff check --fix kldiv tests bench examples

test: lint
	$(BIN)/python -m pytest -q -n 2 tests
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(BIN)/python -m pytest -q -m multidevice tests

bench: $(BSTAMP)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.report > bench/results/REPORT.md

examples: $(STAMP)
	$(BIN)/python examples/vae_digits.py
	$(BIN)/python examples/distill_digits.py
	$(BIN)/python examples/linen_train_state.py
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(BIN)/python examples/data_parallel.py

clean:
	rm -rf $(VENV) build *.egg-info
