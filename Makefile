# Set-up commands that work on a fresh machine. Everything runs inside .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
export TRITON_INTERPRET ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast lint notebooks bench bench-kernels train-tiny clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned to the CPU build on local disk (an open range pulls CUDA).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,server]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mistral_ref demo

lint: $(STAMP)
	$(BIN)/ruff check mistral_ref triton_kernels tests benchmarks notebooks/build.py

# One thread per test process: the tests use tiny models, where threads only fight for the cores.
test: $(STAMP) lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not oracle and not slow"

notebooks: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/test_notebooks.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py --compile $(BENCH_ARGS)

bench-kernels: $(STAMP)
	$(BIN)/python -m triton_kernels.bench

# Re-train the embedded tiny Mixtral (~15 min on one thread; same seed and threads give the same weights).
train-tiny: $(STAMP)
	$(BIN)/pip install -q django==5.2.19
	$(BIN)/python -m mistral_ref.train --out mistral_ref/assets/tiny-mixtral --threads 1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
