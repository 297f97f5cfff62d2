"""A CUDA toolkit from PyPI, for building bert_fast._C's CUDA kernels where none is installed.

Many GPU machines have a driver and PyPI's CUDA build of torch but no `nvcc`. For CUDA 13, NVIDIA
publishes the compiler on PyPI: `nvidia-cuda-nvcc` (the nvcc driver, ptxas, fatbinary, nvlink) with
`nvidia-cuda-crt` (its headers), `nvidia-nvvm` (cicc, libdevice), `nvidia-cuda-runtime` (CUDA
runtime headers and libcudart) and `nvidia-cuda-cccl` (<nv/target>, which cuda_fp16.h includes),
all unpacked into one `nvidia/cu13/` folder. For CUDA 12,
`nvidia-cuda-nvcc-cu12` holds ptxas and libnvvm only, no nvcc driver and no cicc, so a CUDA 12
torch needs a system toolkit (the error says so).

setup.py calls `toolkit_for_torch` when it finds no toolkit: the packages matching torch's CUDA
release (`==13.0.*` for torch's CUDA 13.0) are installed with pip into a folder of their own
(`pip install --target`, nothing is added to the environment) and a CUDA_HOME is assembled next to
them from links: bin/ and nvvm/ are the packages' own folders (nvcc finds cicc and its headers
relative to itself), include/ and lib64/ merge the packages' headers and libraries with those the
torch wheel brought (cuBLAS, cuSPARSE, ...: ATen's CUDA headers include them), and
lib64/libcudart.so points at the versioned library the wheels ship (torch's build links -lcudart).
Stdlib only: setup.py imports this before torch's build helpers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# What a build needs besides the nvcc driver, per CUDA major release (PyPI names).
PACKAGES = {"13": ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-runtime",
                   "nvidia-cuda-cccl")}


class ToolkitError(RuntimeError):
    """No CUDA toolkit can be had from PyPI for this torch; the message says why and what to do."""


def requirements(torch_cuda: str) -> list[str]:
    """pip requirements for the toolkit matching torch's CUDA release ('13.0' -> '...==13.0.*')."""
    found = re.match(r"(\d+)\.(\d+)", torch_cuda or "")
    if not found:
        raise ToolkitError(f"torch reports no CUDA release ({torch_cuda!r}): it is not a CUDA build")
    major, release = found.group(1), found.group(0)
    if major not in PACKAGES:
        raise ToolkitError(
            f"PyPI has no nvcc for CUDA {release} (nvidia-cuda-nvcc-cu{major} ships ptxas and libnvvm only, "
            "no nvcc driver); install a CUDA toolkit and put its bin/ on PATH or set CUDA_HOME")
    return [f"{name}=={release}.*" for name in PACKAGES[major]]


def nvcc_root(site: Path) -> Path | None:
    """The folder holding bin/nvcc in a pip-installed layout (`site` is site-packages or a
    `pip install --target` folder), or None."""
    for root in sorted((site / "nvidia").glob("*")):
        if (root / "bin" / "nvcc").is_file():
            return root
    return None


def package_roots(sites: list[Path]) -> list[Path]:
    """Every nvidia/<package>/ folder with headers or libraries under `sites`, in order."""
    roots = []
    for site in sites:
        for root in sorted((site / "nvidia").glob("*")):
            if root.is_dir() and ((root / "include").is_dir() or (root / "lib").is_dir()):
                roots.append(root)
    return roots


def _link_entries(dest: Path, sources: list[Path]) -> None:
    """Links every entry of every source folder into `dest`; the first source to hold a name wins."""
    dest.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if not source.is_dir():
            continue
        for entry in sorted(source.iterdir()):
            if entry.name == "__init__.py" or entry.name == "__pycache__":
                continue
            target = dest / entry.name
            if not target.exists() and not target.is_symlink():
                target.symlink_to(entry)


def assemble_home(home: Path, nvcc_at: Path, roots: list[Path]) -> Path:
    """A CUDA_HOME of links: bin/ and nvvm/ of the nvcc package, include/ and lib64/ merged from
    `roots` (the nvcc package's first), and lib64/libcudart.so for torch's -lcudart."""
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    (home / "bin").symlink_to(nvcc_at / "bin")
    if (nvcc_at / "nvvm").is_dir():
        (home / "nvvm").symlink_to(nvcc_at / "nvvm")
    ordered = [nvcc_at] + [r for r in roots if r != nvcc_at]
    _link_entries(home / "include", [r / "include" for r in ordered])
    _link_entries(home / "lib64", [r / "lib" for r in ordered])
    lib64 = home / "lib64"
    if not (lib64 / "libcudart.so").exists():
        versioned = sorted(lib64.glob("libcudart.so.*"))
        if not versioned:
            raise ToolkitError(f"no libcudart.so.* among {[str(r / 'lib') for r in ordered]}")
        (lib64 / "libcudart.so").symlink_to(versioned[0].resolve())
    return home


def installed_version(site: Path, package: str) -> str | None:
    """The version of `package` pip installed into `site` (from its .dist-info folder)."""
    prefix = package.replace("-", "_") + "-"
    for info in site.glob(f"{prefix}*.dist-info"):
        return info.name[len(prefix):-len(".dist-info")]
    return None


def describe(torch_cuda: str, nvcc_version: str, home: Path) -> str:
    """The one line a build prints about this toolkit."""
    return f"nvcc {nvcc_version} from PyPI (nvidia-cuda-nvcc for torch's CUDA {torch_cuda}) in {home}"


def install(reqs: list[str], target: Path, python: str = sys.executable) -> None:
    """pip install --target: the packages alone, into `target` only."""
    target.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--upgrade", "--target", str(target), *reqs]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolkitError(f"`{' '.join(cmd)}` failed:\n{(done.stdout + done.stderr)[-2000:]}")


def toolkit_for_torch(torch_cuda: str, cache: Path, sites: list[Path]) -> tuple[Path, str]:
    """(CUDA_HOME, the line that names it) for torch's CUDA release: the packages are installed
    into cache/<release>/packages the first time and reused after; `sites` (the environment's
    site-packages) add the libraries' headers the torch wheel brought."""
    reqs = requirements(torch_cuda)
    folder = cache / re.match(r"\d+\.\d+", torch_cuda).group(0)
    packages, home, stamp = folder / "packages", folder / "home", folder / "stamp.json"
    want = {"requirements": reqs, "sites": [str(s) for s in sites]}
    if not (stamp.exists() and json.loads(stamp.read_text()) == want and (home / "bin" / "nvcc").exists()):
        stamp.unlink(missing_ok=True)
        shutil.rmtree(packages, ignore_errors=True)
        install(reqs, packages)
        nvcc_at = nvcc_root(packages)
        if nvcc_at is None:
            raise ToolkitError(f"{reqs[0]} installed into {packages} but holds no bin/nvcc")
        assemble_home(home, nvcc_at, package_roots([packages, *sites]))
        stamp.write_text(json.dumps(want))
    version = installed_version(packages, "nvidia-cuda-nvcc") or "?"
    return home, describe(torch_cuda, version, home)


def system_cuda_home() -> str | None:
    """Where torch's build would find a CUDA toolkit (its own search: CUDA_HOME, CUDA_PATH, nvcc
    on PATH, /usr/local/cuda), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    return None
