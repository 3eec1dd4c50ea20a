# Set-up commands that work on a fresh machine. Everything runs inside .venv; README "Install" explains each step.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | md5sum | cut -c1-12)
# PyTorch's index of CPU-only wheels (https://pytorch.org/get-started/locally/, "Compute Platform: CPU").
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# The versions the test suite last passed with: `make` installs these so that every set-up is the same;
# pyproject.toml states the ranges that `pip install mistral-ref` accepts.
TESTED := torch==2.13.0 triton==3.8.0
export TRITON_INTERPRET ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast lint notebooks bench bench-kernels bench-server train-tiny gpu-test gpu-check clean

$(STAMP): pyproject.toml Makefile
	@echo "== [1/3] virtual environment $(VENV)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	printf '%s\n' $(TESTED) > $(VENV)/tested-versions.txt
	@echo "== [2/3] torch, CPU build (PyPI's Linux wheel is the CUDA build: 3 GB of GPU libraries)"
	@# A CPU wheel that pip's configured sources hold locally (find-links) is used as is; otherwise torch comes
	@# from PyTorch's CPU index. `pip install --dry-run --no-index` asks the local sources only, without installing.
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "torch $$($(BIN)/python -c 'import torch; print(torch.__version__)') is already installed: kept"; \
	else \
	  local=$$($(BIN)/pip install --dry-run --no-index --no-deps --quiet --report - \
	           -c $(VENV)/tested-versions.txt torch 2>/dev/null \
	         | $(BIN)/python -c "import json, sys; print(json.load(sys.stdin)['install'][0]['metadata']['version'])" \
	           2>/dev/null); \
	  case "$$local" in \
	    *+cpu*) echo "installing torch $$local, the CPU wheel found in pip's local sources (pip config list)"; \
	            $(BIN)/pip install "torch==$$local" ;; \
	    *)      echo "no local CPU torch wheel: installing torch from PyTorch's CPU index $(TORCH_CPU_INDEX)"; \
	            $(BIN)/pip install --index-url $(TORCH_CPU_INDEX) -c $(VENV)/tested-versions.txt torch ;; \
	  esac; \
	fi
	@echo "== [3/3] mistral-ref (editable) with its test and kernels extras"
	$(BIN)/pip install -c $(VENV)/tested-versions.txt -e '.[test,kernels]'
	touch $(STAMP)
	@echo "== installed: $$($(BIN)/python -c 'import torch, mistral_ref; print(f"mistral-ref {mistral_ref.__version__}, torch {torch.__version__}")')"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mistral_ref demo

lint: $(STAMP)
	$(BIN)/ruff check mistral_ref triton_kernels parity_oracles tests benchmarks notebooks/build.py

# One thread per test process: the tests use tiny models, where threads only fight for the cores.
test: $(STAMP) lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not oracle and not slow"

notebooks: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/test_notebooks.py

# llama.cpp, the bench's second peer, comes from llama-cpp-python (the `bench` extra), an sdist that compiles
# llama.cpp for this CPU (GGML_NATIVE: AVX2/AVX-512 as the CPU has them; no GPU back-end, no multimodal library)
# the first time: minutes. Where it cannot be built the bench runs without it, saying so in one line;
# `rm .venv/.llama-cpp-failed` tries again.
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

bench: $(STAMP)
	@if $(BIN)/python -c "import llama_cpp" 2>/dev/null; then :; \
	elif [ -e $(VENV)/.llama-cpp-failed ]; then \
	  echo "llama.cpp peer skipped: llama-cpp-python failed to build before ($(VENV)/llama-cpp-build.log; rm $(VENV)/.llama-cpp-failed to retry)"; \
	else \
	  echo "== building llama-cpp-python, llama.cpp from source for this CPU (minutes; log: $(VENV)/llama-cpp-build.log)"; \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install -c $(VENV)/tested-versions.txt -e '.[bench]' \
	    > $(VENV)/llama-cpp-build.log 2>&1 \
	  || { touch $(VENV)/.llama-cpp-failed; \
	       echo "llama.cpp peer skipped: llama-cpp-python could not be built (log: $(VENV)/llama-cpp-build.log)"; }; \
	fi
	$(BIN)/python benchmarks/bench.py --compile --long-context 2048 $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_compile.py $(BENCH_COMPILE_ARGS)  # chat --compile: first token cold / warm
	$(BIN)/python benchmarks/bench_operators.py --rounds 2  # the gemv operators in C++ vs Python, compiled step
	$(BIN)/python benchmarks/bench_cpu_builds.py  # the C kernel builds (prefetch, AVX-512) side by side
	$(BIN)/python benchmarks/bench_attention.py  # a bf16 prompt's attention: two GEMMs a block vs SDPA

bench-kernels: $(STAMP)
	$(BIN)/python -m triton_kernels.bench

# `mistral-ref serve` under 1, 8 and 32 concurrent clients, batched vs one request at a time, then a memory soak
# (~15 min on 2 cores; BENCH_ARGS="--models embedded --soak 0" for a quick look).
bench-server: $(STAMP)
	$(BIN)/python benchmarks/bench_server.py $(BENCH_ARGS)

# Re-train the embedded tiny Mixtral (~15 min on one thread; same seed and threads give the same weights).
train-tiny: $(STAMP)
	$(BIN)/pip install -e '.[train]'
	$(BIN)/python -m mistral_ref.train --out mistral_ref/assets/tiny-mixtral --threads 1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# On a machine with an NVIDIA GPU: the Triton tests compiled for the device (no interpreter), then the kernel
# harness. It uses the Python named by GPU_PY (one with a CUDA build of torch, Triton and this project's test extra
# installed, e.g. `pip install -e '.[test,kernels]'` in a CUDA environment), not the CPU-only .venv. The tests run
# to the end (no -x): a GPU lease is short, and one run should show every failure.
GPU_PY ?= python3
GPU_OUT ?= bench-out-gpu
gpu-test:
	$(GPU_PY) -c "import torch; assert torch.cuda.is_available(), 'gpu-check needs a CUDA GPU and a CUDA build of torch'; print(torch.cuda.get_device_name())"
	TRITON_INTERPRET=0 $(GPU_PY) -m pytest -q --durations=10 tests/test_triton_*.py tests/test_family_triton.py
gpu-check: gpu-test
	TRITON_INTERPRET=0 $(GPU_PY) -m triton_kernels.bench --out $(GPU_OUT)
