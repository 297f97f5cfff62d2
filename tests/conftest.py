import importlib.util
import os
import subprocess
import sys

# Nothing may reach a model hub: every weight and tokenizer comes from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import early  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # Triton decides at import time whether kernels are interpreted, so one process is either
    # way. `pytest -m gpu` on a CUDA machine compiles them for the device; every other run
    # (CI, `make test`) interprets them on the CPU. Set before any test module imports triton.
    gpu_run = config.getoption("markexpr", "").strip() == "gpu" and torch.cuda.is_available()
    os.environ.setdefault("TRITON_INTERPRET", "0" if gpu_run else "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- runs started early (tests/early.py) ----------------------------------------------------

def pytest_collection_finish(session):
    early.start(session)


def pytest_sessionfinish(session):
    early.stop()


def pytest_terminal_summary(terminalreporter):
    lines = early.timeline()
    if lines:
        terminalreporter.section("runs started early (tests/early.py)")
        for line in lines:
            terminalreporter.write_line(line)


_BUILD_SHM_OP = """
from bert_fast.train.engine import use_cpu_accelerator_without_gpu
use_cpu_accelerator_without_gpu()
from deepspeed.comm.torch import build_shm_op
build_shm_op()
"""


@early.job
def deepspeed_shm_op(folder, threads):
    """DeepSpeed's CPU shared-memory all-reduce op, which every DeepSpeed start (a 2-rank launch or
    a world-of-one `pretrain.py`) loads, built beside the first tests: its build (two g++ at once,
    ~40 s) runs whenever the build is stale, as on a fresh checkout or after another checkout on
    this machine built it with its own paths, and until now the first DeepSpeed test waited for it.
    Never killed: torch's build lock would outlive it. A module that starts DeepSpeed asks for it
    with `pytest.mark.usefixtures("deepspeed_shm_op")`; pretrain.py's runs find it built."""
    if importlib.util.find_spec("deepspeed") is None:
        return None
    done = subprocess.run([sys.executable, "-c", _BUILD_SHM_OP], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder
