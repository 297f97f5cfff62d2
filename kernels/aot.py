"""Ahead-of-time compilation of Triton kernels for Hopper, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the whole pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> ptxas -> cubin) on a CPU-only machine, so tests can prove that every kernel
configuration compiles for sm_90, read its register count and spills, and check that the tensor-core
path uses Hopper's warpgroup MMA (wgmma in PTX, HGMMA in SASS) rather than the older mma.sync.

Under `TRITON_INTERPRET=1` (how the CPU tests run) `@triton.jit` returns interpreter objects that
cannot be compiled, so the compilation then happens in a subprocess that imports the kernel's
module with the interpreter off. Registers come from the cubin (`cuobjdump -res-usage`); spill bytes
from `ptxas -v` on the same PTX, as Triton's own ptxas call does not report them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import triton


@dataclasses.dataclass
class AotReport:
    name: str
    registers: int
    spills: int  # bytes of spill stores + spill loads reported by ptxas
    shared_bytes: int
    uses_wgmma: bool
    num_warps: int
    num_stages: int
    constexprs: dict
    # SASS instructions in the main inner loop's body (see `inner_loop_instructions`); None when
    # the kernel has no loop.
    instructions_per_iteration: int | None = None
    # Lengths of every innermost loop that runs tensor-core instructions, in program order (a
    # kernel may have several: full and masked tiles, or peeled first/middle/last tiles).
    mma_loops: list = dataclasses.field(default_factory=list)

    def row(self) -> dict:
        """One flat row for a table (constexprs as a compact string)."""
        row = dataclasses.asdict(self)
        row["constexprs"] = " ".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        return row


@dataclasses.dataclass
class AotSpec:
    fn: object  # a @triton.jit function, possibly wrapped in autotune/heuristics
    signature: dict  # non-constexpr argument name -> Triton type ("*fp32", "i32", "fp32", ...)
    constexprs: dict  # constexpr (and heuristic-set) argument name -> value
    num_warps: int = 4
    num_stages: int = 3
    # Mark pointers and `stride*` arguments divisible by 16, as Triton specialises them at run time
    # when they are (BERT's hidden sizes and contiguous tensors): without it the report describes
    # scalar-load kernels that never run.
    aligned: bool = True
    # Integer arguments that are multiples of 16 where the kernel runs (BERT's hidden sizes), as
    # Triton specialises them: a row kernel's column mask then covers whole 16-byte vectors.
    divisible: tuple = ()


def _tool_dir() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def unavailable_reason() -> str | None:
    """Why AOT compilation for sm_90 cannot run here, or None when it can."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        return f"this triton has no AOT compile API ({err})"
    for tool in ("ptxas", "cuobjdump", "nvdisasm"):
        if not (_tool_dir() / tool).exists():
            return f"triton's NVIDIA backend ships no {tool} in {_tool_dir()}"
    return None


def _unwrap(fn):
    """The bare jit function under autotune/heuristics wrappers."""
    while type(fn).__name__ not in ("JITFunction", "InterpretedFunction") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def constexpr_names(fn) -> set[str]:
    """Names of the `tl.constexpr` arguments of a (possibly wrapped or interpreted) kernel."""
    raw = getattr(_unwrap(fn), "fn", fn)
    names = set()
    for name, param in inspect.signature(raw).parameters.items():
        note = param.annotation  # a string under `from __future__ import annotations`
        if note is triton.language.constexpr or (isinstance(note, str) and note.endswith("constexpr")):
            names.add(name)
    return names


def _locate(fn) -> tuple[str, str]:
    fn = _unwrap(fn)
    raw = getattr(fn, "fn", fn)
    return raw.__module__, raw.__name__


def _interpreting(fn) -> bool:
    return type(_unwrap(fn)).__name__ == "InterpretedFunction"


def _run(tool: str, *args: str) -> str:
    done = subprocess.run([str(_tool_dir() / tool), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout + done.stderr


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")
_TENSOR_CORE = ("HGMMA", "HMMA", "WGMMA")


def sass_loops(sass: str) -> list[list[str]]:
    """The bodies of the loops in `nvdisasm` output, one list of instructions per backward branch
    (from its target label to the branch, inclusive), in program order of their ends."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = _SASS_LINE.search(line)
        if found:
            instructions.append(found.group(2).strip())
    loops = []
    for i, text in enumerate(instructions):
        branch = _SASS_BRANCH.search(text)
        if branch and labels.get(branch.group(1), len(instructions)) <= i:
            loops.append((labels[branch.group(1)], i))
    # Innermost only: a loop that contains another loop is an outer loop. A branch to itself is the
    # trap every kernel ends with, not a loop.
    loops = [(a, b) for a, b in loops if b > a]
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [instructions[a:b + 1] for a, b in inner]


def _mma_count(body: list[str]) -> int:
    return sum(any(op in text for op in _TENSOR_CORE) for text in body)


def mma_loop_instructions(sass: str) -> list[int]:
    """Lengths of the innermost loops with tensor-core instructions, in program order."""
    return [len(body) for body in sass_loops(sass) if _mma_count(body)]


def inner_loop_instructions(sass: str) -> int | None:
    """Length of the main inner loop: among innermost loops, the one with the most tensor-core
    instructions (the first in program order on a tie, which for the attention kernels is the
    loop over full tiles, before the masked tail), or the longest when none has any."""
    loops = sass_loops(sass)
    if not loops:
        return None
    best = max(range(len(loops)), key=lambda i: (_mma_count(loops[i]), _mma_count(loops[i]) == 0 and
                                                 len(loops[i]), -i))
    return len(loops[best])


def _build(spec: AotSpec, arch: int):
    """The Triton compile of `spec` for `arch` (TTIR to cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _unwrap(spec.fn)
    signature = dict(spec.signature)
    signature.update({name: "constexpr" for name in spec.constexprs})
    missing = [name for name in fn.arg_names if name not in signature]
    if missing:
        raise ValueError(f"{fn.__name__}: signature/constexprs miss arguments {missing}")
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, kind in spec.signature.items()
             if (spec.aligned and (kind.startswith("*") or name.startswith("stride")))
             or name in spec.divisible}
    src = ASTSource(fn, signature, constexprs=dict(spec.constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def _measure(spec: AotSpec, kernel, arch: int) -> AotReport:
    """Registers, spills and SASS loops of a built kernel, read by the CUDA tools."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = Path(tmp, "k.cubin"), Path(tmp, "k.ptx")
        cubin.write_bytes(kernel.asm["cubin"])
        ptx.write_text(kernel.asm["ptx"])
        usage = _run("cuobjdump", "-res-usage", str(cubin))
        sass = _run("nvdisasm", "-c", str(cubin))
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        ptxas = _run("ptxas", "-v", "--gpu-name", gpu, str(ptx), "-o", str(Path(tmp, "v.cubin")))
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas))
    return AotReport(name=kernel.metadata.name, registers=registers, spills=spills,
                     shared_bytes=int(kernel.metadata.shared),
                     uses_wgmma="wgmma.mma_async" in kernel.asm["ptx"], num_warps=spec.num_warps,
                     num_stages=spec.num_stages, constexprs=dict(spec.constexprs),
                     instructions_per_iteration=inner_loop_instructions(sass),
                     mma_loops=mma_loop_instructions(sass))


def _compile_here(specs: list[AotSpec], arch: int) -> list[AotReport]:
    kernels = [_build(spec, arch) for spec in specs]  # Triton's compiler, one kernel at a time
    # The tools are separate processes (nvdisasm takes most of a report's time): one per core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="aot-tools") as pool:
        return list(pool.map(_measure, specs, kernels, [arch] * len(specs)))


def _compile_in_subprocess(specs: list[AotSpec], arch: int) -> list[AotReport]:
    jobs = [dict(zip(("module", "name"), _locate(s.fn)), signature=s.signature,
                 constexprs=s.constexprs, num_warps=s.num_warps, num_stages=s.num_stages,
                 aligned=s.aligned, divisible=list(s.divisible))
            for s in specs]
    # The child sees the parent's sys.path, so kernels defined in test modules import too.
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-m", "bert_fast.kernels.aot", str(arch)],
                          input=json.dumps(jobs), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{done.stderr[-4000:]}")
    return [AotReport(**row) for row in json.loads(done.stdout)]


def compile_reports(specs: list[AotSpec], arch: int = 90) -> list[AotReport]:
    """Compile every spec for `arch` (90 = Hopper) and report registers, spills, shared memory."""
    if any(_interpreting(s.fn) for s in specs):
        return _compile_in_subprocess(specs, arch)
    return _compile_here(specs, arch)


def compile_report(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                   arch: int = 90, aligned: bool = True) -> AotReport:
    return compile_reports([AotSpec(fn, signature, constexprs, num_warps, num_stages, aligned)], arch)[0]


@functools.cache
def _module(name: str):
    return importlib.import_module(name)


def _main() -> None:
    """Subprocess entry: JSON list of jobs on stdin, JSON list of reports on stdout."""
    arch = int(sys.argv[1])
    specs = [AotSpec(getattr(_module(job.pop("module")), job.pop("name")), **job)
             for job in json.loads(sys.stdin.read())]
    json.dump([dataclasses.asdict(r) for r in _compile_here(specs, arch)], sys.stdout)


if __name__ == "__main__":
    _main()
