"""Ahead-of-time sm_90 builds of the MLM-loss kernels (tests and `bench/mlm_loss.py
--compile-report`), without a GPU, through kernels/aot.py: what bench/results/aot/mlm_loss.json holds.

Pointers and strides are marked divisible by 16 (aot's default), which the launchers guarantee: the
logits buffer's rows are padded to the stats kernel's BLOCK_V (mlm_loss.padded_stride) and the
bias partials share that stride. Every kernel is built at BERT's vocabulary (30522, a multiple of
no tile) in each input dtype, with int64 labels (what the data pipeline gives).

Per row of the report: `loops`, the length of every innermost loop in program order (SASS
instructions one thread issues per iteration; ptxas may unroll one, as it does the finish kernel's
bias-partial sum); `instructions_per_iteration`, the first one's (the stats kernel's loop over full
tiles, the gradient kernel's over full row steps; the backward's scaling kernel has no loop);
`skippable`, how many of those sit behind a branch taken only sometimes (the stats kernel's argmax
search, run in the tiles where a row's max grows: a few of a row's 30); and, for the two passes
over the logits, `instructions_per_element` = (instructions_per_iteration - skippable) x threads /
logits per iteration, the figure to compare across tile shapes and with the kernel this design
replaced (29 + 20 at bf16 as it ran; bench/results/aot/README.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bert_fast.kernels import aot
from bert_fast.kernels import mlm_loss as mlm

VOCAB = 30522  # BERT's uncased WordPiece vocabulary
DTYPES = ("bf16", "fp16", "fp32")


def _signatures(dtype: str, labels: str) -> dict:
    """Triton types of each kernel's non-constexpr arguments, in argument order."""
    rows = {"row0": "i32", "rows": "i32", "stride_logits_row": "i32", "V": "i32"}
    scale = {"GradLoss": "*fp32", "Count": "*fp32"}
    for t, n in (("X", "nx"), ("W", "nw"), ("B", "nb")):
        scale.update({f"Grad{t}In": "*fp32", f"Grad{t}Out": f"*{dtype}", n: "i32"})
    return {
        "stats": {"Logits": f"*{dtype}", "Bias": f"*{dtype}", "Labels": f"*{labels}", "Lse": "*fp32",
                  "Loss": "*fp32", "Correct": "*i32", "Shift": "*fp32", "Target": "*i32", **rows},
        "grad": {"Logits": f"*{dtype}", "Bias": f"*{dtype}", "Shift": "*fp32", "Target": "*i32",
                 "BiasPartial": "*fp32", **rows},
        "finish": {"Loss": "*fp32", "Correct": "*i32", "Labels": f"*{labels}", "BiasPartial": "*fp32",
                   "LossOut": "*fp32", "CorrectOut": "*i64", "CountOut": "*fp32", "GradBias": "*fp32",
                   "N": "i32", "V": "i32", "blocks": "i32", "stride_partial": "i32"},
        "scale_grads": scale,
    }


def specs(dtype: str = "bf16", labels: str = "i64", vocab: int = VOCAB) -> list[tuple[str, aot.AotSpec, int]]:
    """(kernel name, spec, logits one iteration of its first loop covers, or None) for every kernel
    at the launchers' configs for `vocab`."""
    sig = _signatures(dtype, labels)
    stats, grad = mlm.stats_config(vocab), mlm.grad_config(vocab)
    finish = dict(IGNORE_INDEX=mlm.IGNORE_INDEX, BLOCK=mlm.FINISH_BLOCK, ROW_BLOCK=mlm.FINISH_ROWS,
                  HAS_BIAS_GRAD=True)
    return [
        ("stats", aot.AotSpec(mlm._mlm_stats_kernel, sig["stats"],
                              dict(IGNORE_INDEX=mlm.IGNORE_INDEX, BLOCK_R=stats["BLOCK_R"],
                                   BLOCK_V=stats["BLOCK_V"]), stats["num_warps"], 1),
         stats["BLOCK_R"] * stats["BLOCK_V"]),
        ("grad", aot.AotSpec(mlm._mlm_grad_kernel, sig["grad"],
                             dict(BLOCK_M=grad["BLOCK_M"], SUB_M=grad["SUB_M"], BLOCK_V=grad["BLOCK_V"],
                                  HAS_BIAS_GRAD=True, ACCUMULATE=False), grad["num_warps"], 1),
         grad["SUB_M"] * grad["BLOCK_V"]),
        # One program of each sweeps N or the bias partials once per call: no per-logit figure.
        ("finish", aot.AotSpec(mlm._mlm_finish_kernel, sig["finish"], finish, mlm.FINISH_WARPS, 1), None),
        ("scale_grads", aot.AotSpec(mlm._mlm_scale_grads_kernel, sig["scale_grads"],
                                    dict(BLOCK=mlm.SCALE_BLOCK), mlm.SCALE_WARPS, 1), None),
    ]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")


def loop_paths(sass: str) -> list[tuple[int, int]]:
    """(length, skippable) of every innermost loop in `nvdisasm` output, in program order (not the
    one-instruction `BRA` to itself that ends every kernel): skippable counts the instructions a
    predicated forward branch inside the loop can jump over (an `if` without `else`), which the
    common iteration does not issue."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = _LINE.search(line)
        if found:
            instructions.append(found.group(2).strip())
    loops = []
    for i, text in enumerate(instructions):
        branch = _BRANCH.search(text)
        if branch and labels.get(branch.group(1), len(instructions)) < i:
            loops.append((labels[branch.group(1)], i))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    out = []
    for a, b in inner:
        skipped = set()
        for i in range(a, b):
            branch = _BRANCH.search(instructions[i])
            target = labels.get(branch.group(1)) if branch and instructions[i].startswith("@") else None
            if target is not None and i < target <= b:
                skipped.update(range(i + 1, target))
        out.append((b - a + 1, len(skipped)))
    return out


def _paths_here(spec: aot.AotSpec, arch: int) -> list[tuple[int, int]]:
    """Compile `spec` as aot does (Triton's cache makes this second build of the same kernel
    cheap) and read its loops from the SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = aot._unwrap(spec.fn)
    signature = {**spec.signature, **{name: "constexpr" for name in spec.constexprs}}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in spec.signature.items()
             if spec.aligned and (kind.startswith("*") or name.startswith("stride"))}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=dict(spec.constexprs), attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(kernel.asm["cubin"])
        return loop_paths(aot._run("nvdisasm", "-c", str(cubin)))


def loop_paths_of(specs_: list[aot.AotSpec], arch: int = 90) -> list[list[tuple[int, int]]]:
    """loop_paths of every spec's build; in a subprocess under the interpreter, as aot does."""
    if not any(aot._interpreting(s.fn) for s in specs_):
        return [_paths_here(s, arch) for s in specs_]
    jobs = [dict(zip(("module", "name"), aot._locate(s.fn)), signature=s.signature, constexprs=s.constexprs,
                 num_warps=s.num_warps, num_stages=s.num_stages, aligned=s.aligned) for s in specs_]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-m", "bert_fast.kernels.mlm_loss_aot", str(arch)],
                          input=json.dumps(jobs), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"SASS subprocess failed:\n{done.stderr[-4000:]}")
    return [[tuple(p) for p in paths] for paths in json.loads(done.stdout)]


def report(dtypes=DTYPES, arch: int = 90) -> list[dict]:
    """One row per kernel and input dtype, in the layout of bench/results/aot/mlm_loss.json."""
    named = [(dtype, name, spec, elements) for dtype in dtypes for name, spec, elements in specs(dtype)]
    built = [spec for _, _, spec, _ in named]
    if any(aot._interpreting(s.fn) for s in built):  # two subprocesses (mostly nvdisasm): at once
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(aot.compile_reports, built, arch)
            all_paths = loop_paths_of(built, arch)
            reports = pending.result()
    else:  # Triton compiles in this process, one kernel at a time
        reports, all_paths = aot.compile_reports(built, arch), loop_paths_of(built, arch)
    rows = []
    for (dtype, name, spec, elements), r, paths in zip(named, reports, all_paths):
        length, skippable = paths[0] if paths else (None, 0)
        c = spec.constexprs
        rows.append(dict(
            kernel=name, dtype=dtype, vocab=VOCAB, block_r=c.get("BLOCK_R", c.get("SUB_M")),
            block_m=c.get("BLOCK_M"), block_v=c.get("BLOCK_V", c.get("BLOCK")), num_warps=r.num_warps,
            num_stages=r.num_stages, registers=r.registers, spills=r.spills, shared_bytes=r.shared_bytes,
            uses_wgmma=r.uses_wgmma, instructions_per_iteration=length, skippable=skippable,
            instructions_per_element=(round((length - skippable) * 32 * r.num_warps / elements, 2)
                                      if length and elements else None),
            loops=[n for n, _ in paths]))
    return rows


def _main() -> None:
    """Subprocess entry: JSON list of aot-style jobs on stdin, their loop_paths on stdout."""
    import importlib

    arch = int(sys.argv[1])
    out = []
    for job in json.loads(sys.stdin.read()):
        fn = getattr(importlib.import_module(job.pop("module")), job.pop("name"))
        out.append(_paths_here(aot.AotSpec(fn, **job), arch))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    _main()
