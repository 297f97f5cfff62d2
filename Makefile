# Two commands for a fresh machine: `make pretrain` and `make test`. Both install into .venv
# (created when absent, reused after) and never touch the system Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny-cpu.yaml
CONSTRAINTS ?= constraints.txt

.PHONY: install pretrain test lint clean cuda-check test-gpu-versions

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# torch first (pinned in constraints.txt), then the package built against it without build
# isolation, which would otherwise fetch a second, multi-GB torch (the test extra's DeepSpeed sdist
# imports torch to build, too). Re-runs when sources change.
$(STAMP): $(PY) setup.py $(CONSTRAINTS) $(wildcard csrc/*) $(wildcard csrc/data/*)
	$(PIP) install -c $(CONSTRAINTS) torch numpy pybind11 ninja
	$(PIP) install -c $(CONSTRAINTS) --no-build-isolation -e '.[test]'
	touch $@

install: $(STAMP)

pretrain: install
	$(PY) pretrain.py --config $(CONFIG)

test: install
	$(PY) -m pytest

lint: install
	$(PIP) install --quiet -c constraints.txt ruff
	$(VENV)/bin/ruff check .

# The CUDA build of bert_fast._C (sm_80 + sm_90), checked on a machine without a GPU: a CUDA build
# of torch in its own cached venv (~/.cache/bert_fast/cuda-check-venv, 4.7 GB), this machine's nvcc,
# output in build/cuda-check/. Independent of .venv. CUDA_CHECK_TORCH=2.14.1 picks another torch.
# CUDA_CHECK_NVCC=pypi builds as a GPU machine without a toolkit does: this machine's nvcc hidden,
# nvcc and the CUDA headers from PyPI (setup.py, tools/pypi_cuda.py), output in build/cuda-check-pypi/.
cuda-check:
	$(PYTHON) tools/cuda_check.py $(if $(CUDA_CHECK_TORCH),--torch $(CUDA_CHECK_TORCH)) $(if $(filter pypi,$(CUDA_CHECK_NVCC)),--pypi-nvcc)

# The CPU suite under the GPU machines' versions: Python 3.12, torch 2.11 (PyPI's CUDA 13.0 build, which
# runs on a CPU) and its triton 3.6, in .venv-gpu-versions (about 5 GB, made once; the C++ ops of the
# extension only): `make test` with that venv, interpreter and torch pin. It catches what only those
# versions break before a GPU visit spends its minutes on it (torch 2.11's Dynamo once lost every
# FP8 GEMM's gradient). Not in CI: a second whole suite. PYTHON312 picks the interpreter (default:
# python3.12 on PATH, else pyenv's), GPU_TORCH the torch.
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python 2>/dev/null); do $$p -c '' 2>/dev/null && { echo $$p; break; }; done)
GPU_TORCH ?= 2.11.0
GPU_VENV ?= .venv-gpu-versions
GPU_CONSTRAINTS := build/gpu-versions/constraints-torch-$(GPU_TORCH).txt

# constraints.txt with torch pinned to GPU_TORCH and triton left to it (tools/cuda_check.py's rule).
$(GPU_CONSTRAINTS): constraints.txt tools/cuda_check.py
	mkdir -p $(@D)
	$(PYTHON) -c 'import sys; sys.path.insert(0, "tools"); from pathlib import Path; import cuda_check; cuda_check.build_constraints(Path(sys.argv[1]))' $@
	echo torch==$(GPU_TORCH) >> $@

test-gpu-versions: $(GPU_CONSTRAINTS)
	@test -n "$(PYTHON312)" || { echo "make test-gpu-versions: no Python 3.12 found (the GPU machines run 3.12); set PYTHON312=" >&2; exit 2; }
	BERT_FAST_CUDA=0 $(MAKE) test VENV=$(GPU_VENV) PYTHON=$(PYTHON312) CONSTRAINTS=$(GPU_CONSTRAINTS)

clean:
	rm -rf build *.egg-info bert_fast/_C*.so
