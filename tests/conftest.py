import os

# Nothing may reach a model hub: every weight and tokenizer comes from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
