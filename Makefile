# Two commands for a fresh machine: `make pretrain` and `make test`. Both install into .venv
# (created when absent, reused after) and never touch the system Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny-cpu.yaml

.PHONY: install pretrain test lint clean cuda-check

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

clean:
	rm -rf build *.egg-info bert_fast/_C*.so
