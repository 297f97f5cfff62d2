"""tools/cuda_check.py (`make cuda-check`) without its multi-GB venv: what it reads from nvcc,
cuobjdump and a failed build's log, which kernels it expects, and that it refuses a CPU torch;
and tools/pypi_cuda.py (setup.py's toolkit from PyPI) on a fake pip-installed layout. The builds
themselves run as `make cuda-check` and `make cuda-check CUDA_CHECK_NVCC=pypi` (CI's .ci/run), not
in this suite."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
try:
    import cuda_check
    import pypi_cuda
finally:
    sys.path.remove(str(ROOT / "tools"))

NVCC_VERSION = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""

# `cuobjdump --list-elf` of a build for sm_80 and sm_90 (two .cu files).
LIST_ELF = """ELF file    1: _C.cpython-311-x86_64-linux-gnu.1.sm_80.cubin
ELF file    2: _C.cpython-311-x86_64-linux-gnu.2.sm_90.cubin
ELF file    3: _C.cpython-311-x86_64-linux-gnu.3.sm_80.cubin
ELF file    4: _C.cpython-311-x86_64-linux-gnu.4.sm_90.cubin
"""

RESOURCE_USAGE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN53_GLOBAL__N__3fe7f2b7_20_bias_gelu_kernels_cu_85c35b5525bias_gelu_backward_kernelI6__halfEEvPKT_S4_S4_PS2_llb:
  REG:28 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:417 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN5optim12sumsq_kernelIfEEvNS_5TableEPf:
  REG:20 STACK:0 SHARED:128 LOCAL:0
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Function _ZN5optim12sumsq_kernelIfEEvNS_5TableEPf:
  REG:20 STACK:0 SHARED:128 LOCAL:0
"""

# The ends of two real failed builds' logs (command lines shortened).
GXX_FAILURE = """[5/7] c++ -MMD -MF build/temp/csrc/extension.o.d -Wsign-compare -DNDEBUG -I/venv/torch/include -c csrc/extension.cpp
[6/7] c++ -MMD -MF build/temp/csrc/optim_cuda.o.d -Wsign-compare -DNDEBUG -I/venv/torch/include -c csrc/optim_cuda.cpp
FAILED: [code=1] build/temp/csrc/optim_cuda.o
c++ -MMD -MF build/temp/csrc/optim_cuda.o.d -Wsign-compare -DNDEBUG -I/venv/torch/include -c csrc/optim_cuda.cpp
csrc/optim_cuda.cpp: In function 'CUstream_st* {anonymous}::stream()':
csrc/optim_cuda.cpp:60:43: error: 'getCurrentCUDAStreamm' is not a member of 'c10::cuda'
   60 | cudaStream_t stream() { return c10::cuda::getCurrentCUDAStreamm().stream(); }
      |                                           ^~~~~~~~~~~~~~~~~~~~~
[7/7] /usr/local/cuda/bin/nvcc -MD -MF build/temp/csrc/optim_kernels.o.d -c csrc/optim_kernels.cu
ninja: build stopped: subcommand failed.
Traceback (most recent call last):
subprocess.CalledProcessError: Command '['ninja', '-v', '-j', '2']' returned non-zero exit status 1.
RuntimeError: Error compiling objects for extension
"""

NVCC_FAILURE = """[1/2] /usr/local/cuda/bin/nvcc -MD -MF build/temp/csrc/optim_kernels.o.d -c csrc/optim_kernels.cu
FAILED: [code=2] build/temp/csrc/optim_kernels.o
/usr/local/cuda/bin/nvcc -MD -MF build/temp/csrc/optim_kernels.o.d -c csrc/optim_kernels.cu
csrc/optim_kernels.cu(58): error: identifier "undefined_thing" is undefined
    undefined_thing = 1;
    ^

1 error detected in the compilation of "csrc/optim_kernels.cu".
ninja: build stopped: subcommand failed.
"""


def test_nvcc_release():
    assert cuda_check.nvcc_release(NVCC_VERSION) == "13.0"
    with pytest.raises(cuda_check.CheckError, match="cannot read the CUDA release"):
        cuda_check.nvcc_release("command not found")


def test_elf_arches():
    assert cuda_check.elf_arches(LIST_ELF) == {"80", "90"}
    only_ampere = "\n".join(line for line in LIST_ELF.splitlines() if "sm_80" in line)
    assert cuda_check.elf_arches(only_ampere) == {"80"}
    assert cuda_check.elf_arches("cuobjdump info    : File does not contain device code") == set()


def test_kernels_by_arch_and_missing_kernels():
    found = cuda_check.kernels_by_arch(RESOURCE_USAGE)
    assert sorted(found) == ["80", "90"] and len(found["80"]) == 2 and len(found["90"]) == 1
    expected = {"bias_gelu_backward_kernel", "sumsq_kernel"}
    assert cuda_check.missing_kernels(expected, found["80"]) == set()
    # sm_90 lost the bias+GELU kernel; a name that is only a suffix of another does not count.
    assert cuda_check.missing_kernels(expected, found["90"]) == {"bias_gelu_backward_kernel"}
    assert cuda_check.missing_kernels({"mask_kernel"}, found["80"]) == {"mask_kernel"}


def test_source_kernels_finds_every_global_in_csrc():
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    names = cuda_check.source_kernels(sources)
    declared = sum(s.read_text().count("__global__") for s in sources)
    assert len(names) == declared, (names, declared)  # none missed, however it is declared
    assert {"bias_gelu_forward_kernel", "sumsq_kernel", "lamb_phase2_kernel"} <= names


@pytest.mark.parametrize("log, first, last", [
    (GXX_FAILURE, "FAILED: [code=1] build/temp/csrc/optim_cuda.o", "      |        "),
    (NVCC_FAILURE, "FAILED: [code=2] build/temp/csrc/optim_kernels.o", "1 error detected in the compilation"),
], ids=["g++", "nvcc"])
def test_first_error_shows_the_compiler_message_without_commands(log, first, last):
    shown = cuda_check.first_error(log).splitlines()
    assert shown[0] == first and shown[-1].startswith(last)
    assert any(": error: " in line or "): error: " in line for line in shown)
    assert not any(line.startswith(("[", "c++ -", "/usr/local/cuda/bin/nvcc", "ninja:", "Traceback")) for line in shown)
    if "In function" in log:
        assert shown[1].endswith("In function 'CUstream_st* {anonymous}::stream()':")


def test_first_error_without_an_error_line_shows_the_end():
    log = "\n".join(f"line {i}" for i in range(100))
    assert cuda_check.first_error(log).splitlines() == [f"line {i}" for i in range(80, 100)]


def test_elapsed():
    assert [cuda_check.elapsed(s) for s in (5.4, 59.6, 119.7, 225.2)] == ["5s", "1m00s", "2m00s", "3m45s"]


def test_compiled_objects():
    assert cuda_check.compiled_objects(GXX_FAILURE) == 3
    assert cuda_check.compiled_objects("ninja: no work to do.\n") == 0


def test_build_constraints_drop_torch_and_triton(tmp_path):
    written = cuda_check.build_constraints(tmp_path / "c.txt").read_text().splitlines()
    pins = [line.split("==")[0] for line in written if "==" in line]
    assert "torch" not in pins and "triton" not in pins
    assert {"numpy", "pybind11", "ninja"} <= set(pins)


def test_cuda_home_of_a_wrapper_script(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text('#!/bin/sh\nexec /opt/cuda-13.0/bin/nvcc "$@"\n')
    assert cuda_check.cuda_home_of(wrapper) == Path("/opt/cuda-13.0")
    real = tmp_path / "cuda-12.8" / "bin" / "nvcc"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"\x7fELF")
    assert cuda_check.cuda_home_of(real) == tmp_path / "cuda-12.8"


def test_cuda_versions_must_share_a_major_version():
    cuda_check.check_cuda_versions("2.11.0+cu130", "13.0", "13.0", Path("v"))
    cuda_check.check_cuda_versions("2.14.1+cu132", "13.2", "13.0", Path("v"))  # minor releases mix
    with pytest.raises(cuda_check.CheckError, match=r"built with CUDA 12.8 but nvcc is CUDA 13.0: pick a torch "
                                                    r"for CUDA 13 \(--torch\) or put an nvcc 12.x first"):
        cuda_check.check_cuda_versions("2.9.0+cu128", "12.8", "13.0", Path("v"))
    with pytest.raises(cuda_check.CheckError, match="in v is a CPU build"):
        cuda_check.check_cuda_versions("2.13.0+cpu", None, "13.0", Path("v"))


def make_dry_run(*args: str) -> subprocess.CompletedProcess:
    """`make -n` as a user types it: under `make test` the parent's MAKELEVEL/MAKEFLAGS would make
    it print "make[1]: Entering directory" lines around the commands."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(["make", "--no-print-directory", "-n", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env)


def test_make_target_passes_the_torch_version():
    plain = make_dry_run("cuda-check")
    assert plain.returncode == 0 and plain.stdout.split() == ["python3", "tools/cuda_check.py"], plain
    chosen = make_dry_run("cuda-check", "CUDA_CHECK_TORCH=2.14.1")
    assert chosen.stdout.split()[-2:] == ["--torch", "2.14.1"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_refuses_a_cpu_build_of_torch(tmp_path):
    """A venv whose torch has no CUDA (here: this suite's own CPU torch) is an error naming it,
    before any build starts."""
    import torch

    if torch.version.cuda is not None:
        pytest.skip("needs the CPU build of torch: this suite runs on a CUDA build")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"  # a symlink would lose the suite venv's site-packages
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    major, minor = sys.version_info[:2]
    (venv / ".bert_fast-cuda-check").write_text(f"torch=={torch.__version__} python={major}.{minor}\n")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_check.py"), "--torch", torch.__version__,
                           "--venv", str(venv), "--build", str(tmp_path / "build")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert f"torch {torch.__version__} in {venv} is a CPU build" in done.stderr
    assert not (tmp_path / "build" / "build.log").exists()


# --- the toolkit from PyPI (tools/pypi_cuda.py) --------------------------------------------------

def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _pip_layout(site: Path, version: str = "13.0.88") -> None:
    """What `pip install --target site nvidia-cuda-nvcc==13.0.* ...` leaves: one nvidia/cu13/."""
    root = site / "nvidia" / "cu13"
    for name in ("bin/nvcc", "bin/ptxas", "bin/nvcc.profile", "nvvm/bin/cicc", "include/cuda_runtime.h",
                 "include/crt/host_config.h", "include/cuda_fp16.h", "lib/libcudart.so.13", "nvidia_init.py"):
        _touch(root / name, f"packages {name}")
    _touch(site / "nvidia" / "__init__.py")
    (site / f"nvidia_cuda_nvcc-{version}.dist-info").mkdir()


def _torch_site(site: Path) -> None:
    """The environment torch's CUDA wheel was installed into: cuBLAS etc. beside it."""
    for name in ("cu13/include/cublas_v2.h", "cu13/include/cuda_fp16.h", "cu13/lib/libcublas.so.13",
                 "cu13/lib/libcudart.so.13", "cudnn/include/cudnn.h", "cudnn/lib/libcudnn.so.9"):
        _touch(site / "nvidia" / name, f"torch's {name}")


def test_requirements_match_torchs_cuda_release():
    assert pypi_cuda.requirements("13.0") == ["nvidia-cuda-nvcc==13.0.*", "nvidia-cuda-crt==13.0.*",
                                              "nvidia-nvvm==13.0.*", "nvidia-cuda-runtime==13.0.*",
                                              "nvidia-cuda-cccl==13.0.*"]
    assert pypi_cuda.requirements("13.2.1")[0] == "nvidia-cuda-nvcc==13.2.*"
    with pytest.raises(pypi_cuda.ToolkitError, match="no nvcc for CUDA 12.8.*ptxas and libnvvm only.*CUDA_HOME"):
        pypi_cuda.requirements("12.8")
    with pytest.raises(pypi_cuda.ToolkitError, match="not a CUDA build"):
        pypi_cuda.requirements(None)


def test_cuda_home_assembled_from_a_pip_layout(tmp_path):
    packages, env_site = tmp_path / "packages", tmp_path / "site-packages"
    _pip_layout(packages)
    _torch_site(env_site)
    assert pypi_cuda.nvcc_root(packages) == packages / "nvidia" / "cu13"
    assert pypi_cuda.nvcc_root(env_site) is None
    roots = pypi_cuda.package_roots([packages, env_site])
    home = pypi_cuda.assemble_home(tmp_path / "home", pypi_cuda.nvcc_root(packages), roots)
    # nvcc runs from the package's own bin/, next to nvvm/: its profile finds cicc relative to itself.
    assert (home / "bin" / "nvcc").resolve() == (packages / "nvidia/cu13/bin/nvcc").resolve()
    assert (home / "nvvm" / "bin" / "cicc").read_text() == "packages nvvm/bin/cicc"
    include, lib = home / "include", home / "lib64"
    assert (include / "crt" / "host_config.h").read_text() == "packages include/crt/host_config.h"
    assert (include / "cuda_fp16.h").read_text() == "packages include/cuda_fp16.h"  # the nvcc release wins
    assert (include / "cublas_v2.h").read_text() == "torch's cu13/include/cublas_v2.h"  # ATen's CUDA headers
    assert (include / "cudnn.h").exists() and (lib / "libcublas.so.13").exists()
    assert (lib / "libcudart.so").resolve() == (packages / "nvidia/cu13/lib/libcudart.so.13").resolve()
    assert not (include / "__init__.py").exists()


def test_toolkit_for_torch_installs_once_and_names_itself(tmp_path, monkeypatch):
    installs = []

    def install(reqs, target, python=sys.executable):
        installs.append(reqs)
        _pip_layout(target)

    monkeypatch.setattr(pypi_cuda, "install", install)
    env_site = tmp_path / "site-packages"
    _torch_site(env_site)
    home, line = pypi_cuda.toolkit_for_torch("13.0", tmp_path / "cache", [env_site])
    assert home == tmp_path / "cache" / "13.0" / "home" and (home / "bin" / "nvcc").exists()
    assert line == f"nvcc 13.0.88 from PyPI (nvidia-cuda-nvcc for torch's CUDA 13.0) in {home}"
    assert pypi_cuda.toolkit_for_torch("13.0", tmp_path / "cache", [env_site]) == (home, line)
    assert installs == [pypi_cuda.requirements("13.0")]  # reused, not installed again
    with pytest.raises(pypi_cuda.ToolkitError, match="12.4"):
        pypi_cuda.toolkit_for_torch("12.4", tmp_path / "cache", [env_site])


def test_the_build_names_its_toolkit_in_one_line(tmp_path):
    """setup.py's line, as cuda_check reads it back from the build log."""
    line = pypi_cuda.describe("13.0", "13.0.88", tmp_path / "home")
    log = ("running build_ext\n"
           f"bert_fast: building the CUDA kernels with {line}\n"
           "[1/9] c++ -MMD -c csrc/extension.cpp\n")
    assert cuda_check.toolkit_used(log) == line
    assert cuda_check.toolkit_used("running build_ext\n") is None
    setup = (ROOT / "setup.py").read_text()
    assert 'print(f"bert_fast: building the CUDA kernels with {' in setup


def test_pypi_mode_hides_the_system_nvcc(tmp_path, monkeypatch):
    system, other = tmp_path / "cuda" / "bin", tmp_path / "tools"
    _touch(system / "nvcc")
    _touch(other / "ninja")
    assert cuda_check.hide_nvcc(f"{system}:{other}::{system}") == str(other)
    monkeypatch.setenv("PATH", f"{system}:{other}")
    monkeypatch.setenv("CUDA_HOME", str(system.parent))
    python = tmp_path / "venv" / "bin" / "python"
    env = cuda_check.build_env(python, None, tmp_path / "build")
    assert "CUDA_HOME" not in env and "CUDA_PATH" not in env and env["BERT_FAST_NVCC"] == "pypi"
    assert env["PATH"] == f"{python.parent}:{other}"
    assert env["BERT_FAST_PYPI_CUDA"] == str(tmp_path / "build" / "pypi-cuda")
    system_env = cuda_check.build_env(python, system.parent, tmp_path / "build")
    assert system_env["CUDA_HOME"] == str(system.parent) and "BERT_FAST_NVCC" not in system_env


def test_make_target_passes_the_pypi_option():
    pypi = make_dry_run("cuda-check", "CUDA_CHECK_NVCC=pypi")
    assert pypi.stdout.split() == ["python3", "tools/cuda_check.py", "--pypi-nvcc"]
