PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
BSTAMP := $(VENV)/.installed-bench

.PHONY: test bench bench-full profile test-slow lint format clean examples gpu-check gpu-wheels

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

# The test processes (both workers, the example subprocesses, the multi-device invocation) share
# one JAX compilation cache, emptied first: a program compiled by one is loaded by the others
# (every run starts cold, as on CI).
TEST_CACHE := $(CURDIR)/.jax-test-cache
TEST_ENV := JAX_COMPILATION_CACHE_DIR=$(TEST_CACHE) JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1

# The test runs compile the generated code at LLVM's optimisation level 0 (the optimised HLO,
# its fusions and buffer assignment do not depend on it: tests/test_fused.py,
# test_optimised_hlo_does_not_depend_on_llvm_opt_level): their programs are tiny and compiling
# them is most of their time (pytest tests: 1014 s at level 0 against 1268 s at the default, both
# passing). The examples' training scripts, which tests/test_examples.py runs in subprocesses,
# keep the default level, so optimised code stays tested on real workloads.
OPT0 := --xla_backend_optimization_level=0

test: lint
	rm -rf $(TEST_CACHE)
	$(TEST_ENV) XLA_FLAGS=$(OPT0) $(BIN)/python -m pytest -q -n 2 --durations=40 tests
	$(TEST_ENV) XLA_FLAGS="--xla_force_host_platform_device_count=4 $(OPT0)" \
		$(BIN)/python -m pytest -q -n 2 -m multidevice tests
	rm -rf $(TEST_CACHE)
	$(MAKE) docs

# Headline rows with every peer, in minutes on 2 cores; the sweeps (scaling, cross-over, the
# full-covariance Gaussian pair whose TFP/distrax gradients can hang) are in bench-full.
BENCH_QUICK := --suites logits,fused,gaussian --fused-cases target_logits,target_linear,grad_filter,topk_linear,softcap,penalty \
	--gaussian-cases diag_standard_normal,diag_pair,full_shared_prior --gaussian-rounds 3 \
	--gaussian-timeout 60 --repeats 5

bench: $(BSTAMP)
	$(BIN)/python -m bench $(BENCH_QUICK)
	$(BIN)/python -m bench.report > bench/results/REPORT.md

bench-full: $(BSTAMP)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.report > bench/results/REPORT.md

# Where the time of the chunked logits KL goes on the CPU: XLA's operations per call, summed over
# the runtime's threads, and how many cores they kept busy (bench/results/profile.json).
profile: $(BSTAMP)
	$(BIN)/python -m bench.profile

# The property suite with a large example budget (make test runs the default budget), and the
# cases of the parameter grids that make test leaves out (tests/_grid.py: the full products).
test-slow: $(STAMP)
	KLDIV_HYPOTHESIS_PROFILE=slow $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/test_properties.py -m "slow or not slow"
	$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider -m "slow and not multidevice" tests \
		--deselect tests/test_properties.py

# On a GPU machine, with the Python that has JAX for CUDA there (no venv is built: such a machine
# often has no network). The peers that JAX/torch images lack travel as wheels: `make gpu-wheels`
# here puts them in .whl/ (ignored by git); see bench/gpu.py for the commands on the machine.
GPU_PYTHON ?= python3
GPU_ARGS ?=
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m bench.gpu $(GPU_ARGS)

# Wheels for Python 3.12 on x86-64 Linux: liger-kernel (needs torch and triton, present on CUDA
# images), ejkernel and its pure-Python dependencies (its JAX pin is not enforced: --no-deps).
GPU_WHEELS := liger-kernel==0.8.5 ejkernel==0.0.80.3 beartype==0.23.1 pydantic==2.14.4 \
	pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
gpu-wheels: | $(BIN)/python
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

examples: $(STAMP)
	$(BIN)/python examples/vae_digits.py
	$(BIN)/python examples/distill_digits.py
	$(BIN)/python examples/linen_train_state.py
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(BIN)/python examples/data_parallel.py

clean:
	rm -rf $(VENV) build *.egg-info .jax-test-cache
	rm -rf $(FVENV) dist docs/_build docs/api/_autosummary

# --- Documentation site: Sphinx + MyST, warnings are errors (docs extra) -----------------------
DSTAMP := $(VENV)/.installed-docs

.PHONY: docs

$(DSTAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e ".[docs]"
	touch $@

docs: $(DSTAMP)
	rm -rf docs/api/_autosummary
	$(BIN)/sphinx-build -W --keep-going -E -q -b html docs docs/_build/html

# --- Lowest supported versions: .venv-floor pinned by constraints-floor.txt ---------------------
# The floors of pyproject's dependencies and of the flax extra, and a subset of the tests that
# covers discrete, reductions, family, gaussian and nnx.
FVENV := .venv-floor
FSTAMP := $(FVENV)/.installed-floor
FLOOR_DEPS := flax optax pytest pytest-xdist hypothesis mpmath scipy tfp-nightly
FLOOR_TESTS := tests/test_discrete.py tests/test_reductions.py tests/test_family.py \
	tests/test_gaussian.py tests/test_nnx.py
# Left out for time (the full suite runs them at the pinned versions): the slowest property and
# gradient sweeps, and the Linen example (it needs matplotlib).
FLOOR_K := not (linen_train_state or finite_differences or jit_vmap or softmax_difference \
	or three_input_spaces or nonnegative_and_zero_iff_equal or huge_logits or log_var_range_finite \
	or low_precision or textbook_autodiff or finite_gradients_at_zero or invariant_to_row_constant \
	or broadcast_one_row or masked_infinite_example)

.PHONY: test-floor

$(FVENV)/bin/python:
	$(PY) -m venv $(FVENV)
	$(FVENV)/bin/pip install -q --upgrade pip

$(FSTAMP): pyproject.toml constraints-floor.txt | $(FVENV)/bin/python
	$(FVENV)/bin/pip install -q -c constraints-floor.txt -e ".[flax]" $(FLOOR_DEPS)
	touch $@

test-floor: $(FSTAMP)
	$(FVENV)/bin/python -c "import jax, flax, optax; print('floor:', jax.__version__, flax.__version__, optax.__version__)"
	rm -rf $(TEST_CACHE)
	$(TEST_ENV) XLA_FLAGS=$(OPT0) $(FVENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider \
		$(FLOOR_TESTS) -k "$(FLOOR_K)"
	rm -rf $(TEST_CACHE)
