# Two commands for a fresh machine: `make pretrain` and `make test`. Both install into .venv
# (created when absent, reused after) and never touch the system Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny-cpu.yaml

.PHONY: install pretrain test lint clean

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

clean:
	rm -rf build *.egg-info bert_fast/_C*.so
