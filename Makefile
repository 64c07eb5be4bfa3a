# Two commands for a fresh machine: `make demo` and `make test`.
# On a machine without an NVIDIA driver the CPU build of torch is installed first, so pip never pulls
# the multi-GB CUDA build; on a GPU machine the default (CUDA) wheel is used. Override with
# `make TORCH_SPEC='torch==2.5.1' ...` or TORCH_PIP_ARGS='--index-url <your CPU/CUDA wheel index>'.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch>=2.3
else
TORCH_SPEC ?= torch==2.13.0
endif
TORCH_PIP_ARGS ?=

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/genealign demo

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) data/demo
