"""Every torch-free CUDA source in csrc/ compiles with nvcc for Ampere (sm_80) and Hopper
(sm_90), with no register spills. The GPU itself is exercised by tests/gpu on a GPU machine."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import early
import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
SOURCES = sorted(CSRC.glob("*.cu"))


def test_cuda_sources_exist():
    assert SOURCES, "csrc/ has no .cu files"


ARCHS = ("80", "90")


@early.job
def nvcc_compiles(out, threads) -> dict:
    """(source, arch) -> nvcc's compile of it, with ptxas's report: an early job (tests/early.py),
    the compiles one after another there, at once in this module's turn."""
    if NVCC is None:
        return {}

    def compile_one(source: Path, arch: str) -> subprocess.CompletedProcess:
        return early.run(
            [NVCC, "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
             "-c", str(source), "-o", str(out / f"{source.stem}-{arch}.o")])

    jobs = [(source, arch) for source in SOURCES for arch in ARCHS]
    return dict(zip(jobs, early.each(threads, *(lambda job=job: compile_one(*job) for job in jobs))))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (install a CUDA toolkit to check)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_without_spills(source, arch, nvcc_compiles):
    result = nvcc_compiles[source, arch]
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


@early.job
def binding_compiles(stubs, threads) -> dict:
    """Source -> g++'s syntax-only compile of it against torch's headers; the compiles (single-
    threaded, seconds each) are an early job (tests/early.py), one after another there, at once in
    this module's turn. The CPU wheel of torch lacks one generated header of its CUDA build, so a
    stand-in provides it."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    if _cuda_include() is None:
        return {}
    stub = stubs / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*include_paths(), str(stubs), str(_cuda_include()), sysconfig.get_paths()["include"]]

    def compile_one(source: Path) -> subprocess.CompletedProcess:
        return early.run(["g++", "-std=c++20", "-fsyntax-only", "-DBERT_FAST_WITH_CUDA",
                          *(f"-I{p}" for p in includes), str(source)])

    return dict(zip(BINDINGS, early.each(threads, *(lambda s=s: compile_one(s) for s in BINDINGS))))


@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA toolkit headers (set CUDA_HOME)")
@pytest.mark.parametrize("source", BINDINGS, ids=lambda p: p.name)
def test_cuda_bindings_compile_against_torch_headers(source, binding_compiles):
    """The tensor-side CUDA bindings are built only against a CUDA build of torch (GPU machines,
    `make cuda-check`, which links them for real); a syntax-only compile here catches API mistakes
    within the suite."""
    result = binding_compiles[source]
    assert result.returncode == 0, result.stderr[-4000:]


def test_extension_sources_have_distinct_object_names():
    """torch's ninja build names each object after its source's stem in one folder, so `x.cpp` and
    `x.cu` would both produce `x.o` ("multiple rules generate .../x.o": the CUDA build failed that
    way on an H200 while the CPU build, which has no .cu files, passed)."""
    sources = [p for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu")]
    stems = [p.stem for p in sources]
    assert sorted(stems) == sorted(set(stems)), sorted(p.name for p in sources)
