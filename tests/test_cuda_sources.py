"""Every torch-free CUDA source in csrc/ compiles with nvcc for Ampere (sm_80) and Hopper
(sm_90), with no register spills. The GPU itself is exercised by tests/gpu on a GPU machine."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
SOURCES = sorted(CSRC.glob("*.cu"))


def test_cuda_sources_exist():
    assert SOURCES, "csrc/ has no .cu files"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (install a CUDA toolkit to check)")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_without_spills(source, arch, tmp_path):
    result = subprocess.run(
        [NVCC, "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
         "-c", str(source), "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = result.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", report)
    assert kernels and all(a == arch for _, a in kernels), report
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == len(kernels), report
    assert all(s == ("0", "0") for s in spills), report


def _cuda_include():
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME, "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


BINDINGS = sorted(CSRC.glob("*_cuda.cpp"))


@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA toolkit headers (set CUDA_HOME)")
@pytest.mark.parametrize("source", BINDINGS, ids=lambda p: p.name)
def test_cuda_bindings_compile_against_torch_headers(source, tmp_path):
    """The tensor-side CUDA bindings are built only against a CUDA build of torch (GPU machines,
    `make cuda-check`, which links them for real); a syntax-only compile here catches API mistakes
    within the suite. The CPU wheel of torch lacks one generated header of its CUDA build, so a
    stand-in provides it."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*include_paths(), str(tmp_path), str(_cuda_include()), sysconfig.get_paths()["include"]]
    result = subprocess.run(
        ["g++", "-std=c++20", "-fsyntax-only", "-DBERT_FAST_WITH_CUDA", *(f"-I{p}" for p in includes),
         str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def test_extension_sources_have_distinct_object_names():
    """torch's ninja build names each object after its source's stem in one folder, so `x.cpp` and
    `x.cu` would both produce `x.o` ("multiple rules generate .../x.o": the CUDA build failed that
    way on an H200 while the CPU build, which has no .cu files, passed)."""
    sources = [p for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu")]
    stems = [p.stem for p in sources]
    assert sorted(stems) == sorted(set(stems)), sorted(p.name for p in sources)
