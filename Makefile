# Two commands for a fresh machine: `make pretrain` and `make test`. Both install into .venv
# (created when absent, reused after) and never touch the system Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny-cpu.yaml

.PHONY: install pretrain test lint clean cuda-check test-gpu-versions

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# torch first (pinned in constraints.txt), then the package built against it without build
# isolation, which would otherwise fetch a second, multi-GB torch (the test extra's DeepSpeed sdist
# imports torch to build, too). Re-runs when sources change.
$(STAMP): $(PY) setup.py constraints.txt $(wildcard csrc/*) $(wildcard csrc/data/*)
	$(PIP) install -c constraints.txt torch numpy pybind11 ninja
	$(PIP) install -c constraints.txt --no-build-isolation -e '.[test]'
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
# extension only). It catches what only those versions break before a GPU visit spends its minutes
# on it (torch 2.11's Dynamo once lost every FP8 GEMM's gradient). Not in CI: a second whole suite.
# PYTHON312 picks the interpreter (default: python3.12 on PATH, else pyenv's), GPU_TORCH the torch.
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python 2>/dev/null); do $$p -c '' 2>/dev/null && { echo $$p; break; }; done)
GPU_TORCH ?= 2.11.0
GPU_VENV ?= .venv-gpu-versions
test-gpu-versions:
	@test -n "$(PYTHON312)" || { echo "make test-gpu-versions: no Python 3.12 found (the GPU machines run 3.12); set PYTHON312=" >&2; exit 2; }
	test -x $(GPU_VENV)/bin/python || $(PYTHON312) -m venv $(GPU_VENV)
	grep -v -E '^(torch|triton)==' constraints.txt > $(GPU_VENV)/constraints.txt
	$(GPU_VENV)/bin/pip install --quiet --upgrade pip setuptools wheel
	$(GPU_VENV)/bin/pip install --quiet -c $(GPU_VENV)/constraints.txt torch==$(GPU_TORCH) numpy pybind11 ninja
	BERT_FAST_CUDA=0 $(GPU_VENV)/bin/pip install --quiet -c $(GPU_VENV)/constraints.txt --no-build-isolation -e '.[test]'
	$(GPU_VENV)/bin/python -m pytest

clean:
	rm -rf build *.egg-info bert_fast/_C*.so
