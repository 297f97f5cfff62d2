"""`make cuda-check`: build `bert_fast._C` with its CUDA kernels on a machine without a GPU.

    python3 tools/cuda_check.py [--torch VERSION] [--venv DIR] [--build DIR] [--clean] [--pypi-nvcc]

The CPU wheel of torch has no CUDA headers, so the CUDA bindings are only ever compiled by a CUDA
build of torch: the first GPU run lost its extension to an error no CPU build showed. This builds
the extension as a GPU machine does (setup.py, BERT_FAST_CUDA=1, sm_80 and sm_90) against a CUDA
build of torch kept in its own venv (created once, reused after; nothing else touches it), with
this machine's nvcc, then checks the result: both architectures' code for every kernel in csrc/*.cu
is in the .so, it loads, says it has CUDA kernels, and every `bert_fast::` op has a CPU and a CUDA
kernel; one op runs on the CPU. Nothing needs a GPU. Stdlib only: it runs with any python3 >= 3.10.

`--pypi-nvcc` builds as a GPU machine without a toolkit does: this machine's nvcc hidden from PATH,
CUDA_HOME and CUDA_PATH unset, setup.py takes nvcc and the CUDA headers from PyPI
(tools/pypi_cuda.py, installed into the build folder) and the summary names the toolkit it used.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The GPU machines run torch 2.11 (CUDA 13.0), as does this machine's nvcc: the same headers.
DEFAULT_TORCH = "2.11.0"
ARCHES = ("80", "90")
# What a GPU build needs besides torch, at the versions the CPU venv pins (constraints.txt).
BUILD_PACKAGES = ["numpy", "pybind11", "ninja", "setuptools", "wheel"]


class CheckError(Exception):
    """A failed check: the message says what failed and where its log is."""


def default_venv() -> Path:
    cache = os.environ.get("BERT_FAST_CACHE") or Path.home() / ".cache" / "bert_fast"
    return Path(cache) / "cuda-check-venv"


def elapsed(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole}s" if whole < 60 else f"{whole // 60}m{whole % 60:02d}s"


# --- parsing (tested in tests/test_cuda_check.py) ---------------------------------------------

def nvcc_release(version_text: str) -> str:
    """'13.0' from `nvcc --version`."""
    found = re.search(r"release (\d+\.\d+)", version_text)
    if not found:
        raise CheckError(f"cannot read the CUDA release from `nvcc --version`:\n{version_text}")
    return found.group(1)


def elf_arches(listing: str) -> set[str]:
    """The SASS architectures in `cuobjdump --list-elf` output ('80', '90')."""
    return set(re.findall(r"\.sm_(\d+)[a-z]?\.cubin", listing))


def kernels_by_arch(resource_usage: str) -> dict[str, set[str]]:
    """Mangled kernel names per architecture from `cuobjdump --dump-resource-usage`."""
    found: dict[str, set[str]] = {}
    arch = None
    for line in resource_usage.splitlines():
        header = re.search(r"arch = sm_(\d+)", line)
        if header:
            arch = header.group(1)
            found.setdefault(arch, set())
            continue
        function = re.match(r"\s*Function (\S+?):?$", line)
        if function and arch is not None:
            found[arch].add(function.group(1))
    return found


def source_kernels(sources: list[Path]) -> set[str]:
    """Names of the `__global__` functions defined in the CUDA sources."""
    names = set()
    for source in sources:
        text = re.sub(r"//[^\n]*", "", source.read_text())
        names.update(re.findall(
            r"__global__\s+(?:void\s+)?(?:__launch_bounds__\([^)]*\)\s+)?(?:void\s+)?(\w+)\s*\(", text))
    return names


def missing_kernels(expected: set[str], mangled: set[str]) -> set[str]:
    """The kernels of `expected` with no compiled function (Itanium mangling embeds `<len><name>`)."""
    return {name for name in expected if not any(f"{len(name)}{name}" in m for m in mangled)}


TOOLKIT_LINE = re.compile(r"^bert_fast: building the CUDA kernels with (.+)$", re.M)


def toolkit_used(log: str) -> str | None:
    """The toolkit setup.py says it built with (its one line), from a build log."""
    found = TOOLKIT_LINE.findall(log)
    return found[-1] if found else None


def hide_nvcc(path: str) -> str:
    """PATH without the folders that hold an nvcc."""
    return os.pathsep.join(d for d in path.split(os.pathsep) if d and not (Path(d) / "nvcc").exists())


def compiled_objects(log: str) -> int:
    """Objects ninja compiled (its `[i/n]` lines): 0 when every object was up to date."""
    return len(re.findall(r"^\[\d+/\d+\] ", log, flags=re.M))


ERROR_LINE = re.compile(r"error:|error [A-Z]*\d+|fatal error|undefined reference")


def _is_command(line: str) -> bool:
    """A ninja progress line or a compiler command line (thousands of characters of flags)."""
    return bool(re.match(r"\[\d+/\d+\] |\S*(c\+\+|g\+\+|gcc|nvcc) -", line)) or len(line) > 400


def first_error(log: str, before: int = 6, after: int = 20) -> str:
    """The compiler's first error with its context (the traceback that ends a failed setup.py
    run says only that a command failed): the object ninja was building, the lines that lead to
    the error (`In function ...`, `In file included from ...`) and those after it (source line,
    caret, notes), without the command lines. With no error line, the end of the log."""
    lines = log.splitlines()
    at = next((i for i, line in enumerate(lines) if ERROR_LINE.search(line) and not _is_command(line)), None)
    if at is None:
        return "\n".join(line[:400] for line in lines[-20:])
    start = at
    while start > 0 and at - start < before and not _is_command(lines[start - 1]) \
            and not lines[start - 1].startswith("FAILED"):
        start -= 1
    stop = at + 1
    while stop < len(lines) and stop - at <= after and not _is_command(lines[stop]) \
            and not lines[stop].startswith(("FAILED", "ninja: ", "Traceback")):
        stop += 1
    failed = next((line for line in reversed(lines[:start]) if line.startswith("FAILED")), None)
    return "\n".join(([failed] if failed else []) + lines[start:stop])


# --- steps --------------------------------------------------------------------------------------

def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> int:
    with log.open("w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def find_nvcc() -> Path:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found is None:
        raise CheckError("nvcc is not on PATH and CUDA_HOME is not set: install a CUDA toolkit "
                         "(or the nvidia-cuda-nvcc PyPI package of the CUDA release torch was built for)")
    return Path(found)


def cuda_home_of(nvcc: Path) -> Path:
    """The toolkit folder: CUDA_HOME when set, else the one holding the real nvcc (this
    machine's /usr/local/bin/nvcc is a script that execs /usr/local/cuda-13.0/bin/nvcc)."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    real = nvcc.resolve()
    text = real.read_bytes()[:512]
    wrapper = re.search(rb"exec (\S+/bin/nvcc)", text) if text.startswith(b"#!") else None
    if wrapper:
        real = Path(wrapper.group(1).decode())
    return real.parent.parent


def build_constraints(path: Path) -> Path:
    """constraints.txt without its torch and triton pins (the CUDA torch brings its own triton)."""
    keep = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
            if not re.match(r"\s*(torch|triton)\s*==", line)]
    path.write_text("\n".join(keep) + "\n")
    return path


def ensure_venv(venv: Path, torch_version: str, logs: Path) -> str:
    """Creates the venv unless it already holds this torch; returns what was done."""
    stamp = venv / ".bert_fast-cuda-check"
    want = f"torch=={torch_version} python={sys.version_info[0]}.{sys.version_info[1]}"
    if stamp.exists() and stamp.read_text().strip() == want:
        return "reused"
    if venv.exists():
        print(f"  the venv holds {stamp.read_text().strip() if stamp.exists() else 'an unfinished install'}; "
              f"replacing it with {want}", flush=True)
        shutil.rmtree(venv)
    start = time.monotonic()
    print(f"  creating {venv} with torch=={torch_version} (a CUDA build: several GB, once)", flush=True)
    log = logs / "venv.log"
    if run_logged([sys.executable, "-m", "venv", str(venv)], log) != 0:
        raise CheckError(f"python -m venv failed; see {log}")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off",
           "-c", str(build_constraints(logs / "constraints.txt")), f"torch=={torch_version}", *BUILD_PACKAGES]
    if run_logged(pip, log) != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise CheckError(f"installing torch=={torch_version} failed ({log}):\n{tail}")
    stamp.write_text(want + "\n")
    return f"created in {elapsed(time.monotonic() - start)}"


def venv_torch(python: Path) -> tuple[str, str | None]:
    done = subprocess.run([str(python), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckError(f"torch does not import in the CUDA venv:\n{done.stderr[-2000:]}")
    version, cuda = done.stdout.split()
    return version, None if cuda == "None" else cuda


def build_env(python: Path, cuda_home: Path | None, build_dir: Path) -> dict:
    """setup.py's environment: this machine's toolkit, or (cuda_home None) none at all, so that
    setup.py takes PyPI's into build_dir/pypi-cuda."""
    arch_list = ";".join(f"{a[0]}.{a[1:]}" for a in ARCHES)  # "8.0;9.0"
    env = dict(os.environ, BERT_FAST_CUDA="1", TORCH_CUDA_ARCH_LIST=arch_list,
               MAX_JOBS=str(os.cpu_count() or 1))
    for var in ("BERT_FAST_EXT", "BERT_FAST_NVCC", "BERT_FAST_PYPI_CUDA"):
        env.pop(var, None)
    path = f"{python.parent}:{os.environ.get('PATH', '')}"
    if cuda_home is not None:
        env.update(CUDA_HOME=str(cuda_home), PATH=f"{cuda_home / 'bin'}:{path}")
    else:
        env.pop("CUDA_HOME", None)
        env.pop("CUDA_PATH", None)
        # /usr/local/cuda is not on PATH but torch would find it there: BERT_FAST_NVCC=pypi.
        env.update(PATH=hide_nvcc(path), BERT_FAST_NVCC="pypi",
                   BERT_FAST_PYPI_CUDA=str(build_dir / "pypi-cuda"))
    return env


def build(python: Path, cuda_home: Path | None, build_dir: Path, clean: bool) -> tuple[Path, float]:
    """setup.py build_ext out of the source tree (the CPU venv's in-place .so is left alone).
    Objects are kept: ninja rebuilds those whose sources, headers (torch's too: depfiles) or
    flags changed, then links. Without the old .so, a failed build cannot pass for a good one."""
    shutil.rmtree(build_dir / "lib", ignore_errors=True)
    if clean:
        shutil.rmtree(build_dir / "temp", ignore_errors=True)
    env = build_env(python, cuda_home, build_dir)
    log = build_dir / "build.log"
    start = time.monotonic()
    rc = run_logged([str(python), "setup.py", "build_ext", "--build-lib", str(build_dir / "lib"),
                     "--build-temp", str(build_dir / "temp")], log, env)
    seconds = time.monotonic() - start
    found = sorted((build_dir / "lib" / "bert_fast").glob("_C*.so"))
    if rc != 0 or not found:
        raise CheckError(f"the build failed (whole log: {log}); its first error:\n"
                         + first_error(log.read_text()))
    return found[0], seconds


def find_cuobjdump(python: Path, cuda_home: Path | None) -> str:
    for candidate in (shutil.which("cuobjdump"), cuda_home and cuda_home / "bin" / "cuobjdump"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    # triton ships one (torch's CUDA build depends on triton).
    done = subprocess.run([str(python), "-c", "import os, triton; print(os.path.dirname(triton.__file__))"],
                          capture_output=True, text=True)
    bundled = Path(done.stdout.strip()) / "backends" / "nvidia" / "bin" / "cuobjdump"
    if done.returncode == 0 and bundled.exists():
        return str(bundled)
    raise CheckError("no cuobjdump (CUDA toolkit or triton's) to list the .so's architectures")


def check_device_code(so: Path, cuobjdump: str) -> int:
    """Every kernel of csrc/*.cu compiled for every architecture; returns kernels per architecture."""
    listing = subprocess.run([cuobjdump, "--list-elf", str(so)], capture_output=True, text=True)
    arches = elf_arches(listing.stdout)
    if arches != set(ARCHES):
        raise CheckError(f"{so.name} holds SASS for {sorted(arches) or 'nothing'}, expected "
                         f"{list(ARCHES)}:\n{listing.stdout}{listing.stderr}")
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(so)], capture_output=True, text=True)
    per_arch = kernels_by_arch(usage.stdout)
    expected = source_kernels(sorted((ROOT / "csrc").glob("*.cu")))
    for arch in ARCHES:
        missing = missing_kernels(expected, per_arch.get(arch, set()))
        if missing:
            raise CheckError(f"sm_{arch} code of {so.name} lacks the kernels {sorted(missing)}")
    return len(per_arch[ARCHES[0]])


# Runs in the CUDA venv: the .so loads without a GPU (and without the package's dependencies).
IMPORT_CHECK = r"""
import importlib.util, json, sys
import torch
spec = importlib.util.spec_from_file_location("bert_fast._C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("bert_fast::"))
has = lambda op, key: torch._C._dispatch_has_kernel_for_dispatch_key("bert_fast::" + op, key)
x, bias = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
ours = torch.ops.bert_fast.bias_gelu(x, bias, False)
print(json.dumps({"with_cuda": module.with_cuda(), "ops": ops,
                  "no_cpu": [op for op in ops if not has(op, "CPU")],
                  "no_cuda": [op for op in ops if not has(op, "CUDA")],
                  "cpu_error": float((ours - torch.nn.functional.gelu(x + bias)).abs().max())}))
"""


def check_import(python: Path, so: Path) -> int:
    done = subprocess.run([str(python), "-c", IMPORT_CHECK, str(so)], capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckError(f"{so.name} does not load in the CUDA venv:\n{done.stderr[-3000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    problems = []
    if not found["with_cuda"]:
        problems.append("with_cuda() is false: the CUDA sources were not built in")
    if not found["ops"]:
        problems.append("no bert_fast:: ops are registered")
    if found["no_cpu"] or found["no_cuda"]:
        problems.append(f"ops without a CPU kernel {found['no_cpu']}, "
                        f"without a CUDA kernel {found['no_cuda']}")
    if not found["cpu_error"] < 1e-12:
        problems.append(f"bias_gelu on the CPU differs from torch's GELU by {found['cpu_error']}")
    if problems:
        raise CheckError(f"{so.name}: " + "; ".join(problems))
    return len(found["ops"])


def check_cuda_versions(version: str, torch_cuda: str | None, release: str, venv: Path) -> None:
    """The CUDA torch was built for and nvcc's must share a major version (headers, runtime)."""
    if torch_cuda is None:
        raise CheckError(f"torch {version} in {venv} is a CPU build; pick a version whose PyPI "
                         "wheel is a CUDA build (--torch)")
    want, have = torch_cuda.split(".")[0], release.split(".")[0]
    if want != have:
        raise CheckError(f"torch {version} was built with CUDA {torch_cuda} but nvcc is CUDA {release}: "
                         f"pick a torch for CUDA {have} (--torch) or put an nvcc {want}.x first on PATH "
                         f"(PyPI: nvidia-cuda-nvcc)")


def check(args: argparse.Namespace) -> list[str]:
    """Every step; returns the summary's lines."""
    if args.pypi_nvcc:
        release, cuda_home = None, None
    else:
        nvcc = find_nvcc()
        version_text = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
        release = nvcc_release(version_text)
        cuda_home = cuda_home_of(nvcc)
    args.build.mkdir(parents=True, exist_ok=True)
    args.venv.parent.mkdir(parents=True, exist_ok=True)
    # One check at a time per venv: a second would find it half-built.
    with open(f"{args.venv}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"cuda-check: waiting for another cuda-check ({args.venv}.lock)", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        venv_note = ensure_venv(args.venv, args.torch, args.build)
        python = args.venv / "bin" / "python"
        version, torch_cuda = venv_torch(python)
        if args.pypi_nvcc:
            if torch_cuda is None:
                check_cuda_versions(version, torch_cuda, "", args.venv)
            toolkit = "no system nvcc (hidden from PATH): nvcc from PyPI"
        else:
            check_cuda_versions(version, torch_cuda, release, args.venv)
            toolkit = f"nvcc {release} in {cuda_home}"
        print(f"cuda-check: torch {version} (CUDA {torch_cuda}), venv {args.venv} ({venv_note}); "
              f"{toolkit}; building sm_{', sm_'.join(ARCHES)} ...", flush=True)
        so, seconds = build(python, cuda_home, args.build, args.clean)
        kernels = check_device_code(so, find_cuobjdump(python, cuda_home))
        ops = check_import(python, so)
    log = args.build / "build.log"
    shown = so.relative_to(ROOT) if so.is_relative_to(ROOT) else so
    used = toolkit_used(log.read_text())
    if args.pypi_nvcc and (used is None or "from PyPI" not in used):
        raise CheckError(f"setup.py did not build with PyPI's nvcc (it says: {used!r}; log {log})")
    return [f"  toolkit: {used}",
            f"  built {shown} ({so.stat().st_size / 2**20:.1f} MiB) in {elapsed(seconds)} "
            f"({compiled_objects(log.read_text())} objects compiled, the others up to date; log {log})",
            f"  device code: SASS for sm_{', sm_'.join(ARCHES)}, {kernels} kernels each, every "
            "__global__ of csrc/*.cu in both",
            f"  loads without a GPU: with_cuda() true, {ops} bert_fast ops, each with CPU and CUDA kernels"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch", default=DEFAULT_TORCH,
                   help=f"torch version to build against (default {DEFAULT_TORCH})")
    p.add_argument("--venv", type=Path, default=default_venv(), help="the cached venv (default %(default)s)")
    p.add_argument("--build", type=Path, default=None,
                   help="build folder and logs (default build/cuda-check; build/cuda-check-pypi with "
                        "--pypi-nvcc)")
    p.add_argument("--clean", action="store_true", help="compile every object again (default: what changed)")
    p.add_argument("--pypi-nvcc", action="store_true",
                   help="hide this machine's nvcc; setup.py takes nvcc and the CUDA headers from PyPI")
    args = p.parse_args(argv)
    if args.build is None:
        args.build = ROOT / "build" / ("cuda-check-pypi" if args.pypi_nvcc else "cuda-check")
    start = time.monotonic()
    try:
        summary = check(args)
    except CheckError as err:
        print(f"cuda-check: FAILED after {elapsed(time.monotonic() - start)}: {err}", file=sys.stderr)
        return 1
    print("\n".join(summary + [f"cuda-check: OK in {elapsed(time.monotonic() - start)}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
