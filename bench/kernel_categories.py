"""Sorts a profiled training step's kernels into categories and does its time arithmetic: pure
functions over (name, start, end) intervals, so they are tested on synthetic traces
(tests/test_step_profile.py) and bench/step_profile.py only feeds them a real one.

A kernel's category is the first row of CATEGORIES whose pattern (case-insensitive) is found in its
name; the rest are `other`, and the longest of those are listed so that the table can be improved
after a GPU visit. Busy time is the union of the kernels' intervals (two streams' overlapping
kernels count once), idle is the wall time minus it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import NamedTuple

# (category, pattern), first match wins. Names: H100 traces (cuBLAS, torch's CUDA kernels), our Triton
# kernels' @triton.jit names (kernels/*.py), csrc/*.cu, and on the CPU the top-level aten ops and
# autograd nodes that stand in for kernels.
CATEGORIES: tuple[tuple[str, str], ...] = (
    # Before GEMM: FlashAttention's and fmha's names carry cutlass templates. safe_softmax: the
    # math SDPA's softmax (the CPU path).
    ("attention", r"flash|fmha|_attn_|attention|sdpa|safe_?softmax"),
    ("gemm", r"gemm|gemv|cutlass|cublas|xmma|nvjet|_scaled_mm|splitKreduce|triton_tem_"
             r"|^aten::(addmm|mm|bmm|matmul|linear)$|(addmm|bmm|: mm)backward"),
    ("fp8_cast", r"_fp8_"),
    # _finalize_kernel: kernels/row_norm.py's weight-gradient sum (LayerNorm and the embeddings' norm;
    # anchored: _lamb_finalize_kernel is the optimizer's).
    ("layernorm", r"layer_?norm|GammaBeta|RowwiseMoments|^_finalize_kernel"),
    # The pretraining losses: MLM (and NSP's tiny one, which torch computes alike).
    ("mlm_loss", r"_mlm_|softmax|nll_?loss|cross_entropy"),
    # torch's lookup is index_select; its backward sorts the ids (the step's only sort) and sums
    # segments; ours fuse the LayerNorm and sum segments in kernels/segment_sum.py.
    ("embeddings", r"embedding|_segment_(block|join)_kernel|indexSelect|compute_grad_weight|sum_and_scatter"
                   r"|krn_partial|partials_per_segment|segment_offsets|RadixSort"),
    ("bias_gelu", r"gelu"),
    ("dropout", r"dropout|masked_scale"),
    # Not bare "lamb": every lambda in a templated torch kernel's name would match.
    ("optimizer", r"_lamb_|lamb_phase|adam|multi_tensor|sumsq_kernel|reduce_slots_kernel|_foreach"
                  r"|^Optimizer\."),
    ("elementwise", r"elementwise|reduce_kernel|triton_|CatArrayBatchedCopy|index_put|scatter_gather"),
    ("memcpy", r"memcpy|memset"),
    ("nccl", r"nccl"),
)
OTHER = "other"
NAMES = tuple(name for name, _ in CATEGORIES) + (OTHER,)
_COMPILED = tuple((name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES)
# Trace events on the device that are not work: record_function ranges mirrored on the GPU, syncs.
_NOT_WORK = ("gpu_user_annotation", "cuda_sync")


class Kernel(NamedTuple):
    name: str
    start_us: float
    end_us: float


def category(name: str) -> str:
    for cat, pattern in _COMPILED:
        if pattern.search(name):
            return cat
    return OTHER


def busy_us(kernels: list[Kernel]) -> float:
    """Length of the union of the kernels' intervals."""
    total, end = 0.0, float("-inf")
    for k in sorted(kernels, key=lambda k: k.start_us):
        if k.end_us > end:
            total += k.end_us - max(k.start_us, end)
            end = k.end_us
    return total


def kernels_from_events(events, device_type: str) -> list[Kernel]:
    """The work in torch.profiler events (`prof.events()`): on CUDA the device's kernels, copies and
    memsets; on the CPU the top-level ops of each thread (their children run inside them)."""
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    out = []
    for e in events:
        kind = str(e.device_type).rsplit(".", 1)[-1].lower()  # DeviceType.CUDA -> cuda
        if kind != device_type or getattr(e, "activity_type", None) in _NOT_WORK:
            continue
        if device_type == "cuda" and getattr(e, "is_user_annotation", False):
            continue
        if device_type == "cpu" and e.cpu_parent is not None:
            continue
        out.append(Kernel(e.name, e.time_range.start, e.time_range.end))
    return out


def _check(kernels: list[Kernel], wall_ms: float, steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not wall_ms > 0:
        raise ValueError(f"wall_ms must be > 0, got {wall_ms}")
    for k in kernels:
        if k.end_us < k.start_us:
            raise ValueError(f"kernels: {k.name!r} ends ({k.end_us}) before it starts ({k.start_us})")


def _by_name(kernels: list[Kernel], steps: int) -> list[dict]:
    """One entry per kernel name, per step, longest first."""
    us, count = defaultdict(float), defaultdict(int)
    for k in kernels:
        us[k.name] += k.end_us - k.start_us
        count[k.name] += 1
    return sorted(({"name": n, "category": category(n), "ms": us[n] / 1e3 / steps,
                    "launches": count[n] / steps} for n in us), key=lambda e: -e["ms"])


def summarize(kernels: list[Kernel], wall_ms: float, steps: int, top: int = 15, unmatched: int = 10) -> dict:
    """Per-step figures of `steps` profiled steps that took `wall_ms` in all. A category's `pct` is
    its share of kernel time + idle time (the wall time when no kernels overlap), so the categories'
    and idle's percentages sum to 100."""
    _check(kernels, wall_ms, steps)
    busy = busy_us(kernels) / 1e3 / steps
    wall = wall_ms / steps
    idle = max(wall - busy, 0.0)
    names = _by_name(kernels, steps)
    kernel_ms = sum(e["ms"] for e in names)
    whole = kernel_ms + idle
    cats = {c: {"ms": 0.0, "pct": 0.0, "launches": 0.0} for c in NAMES}
    for e in names:
        cats[e["category"]]["ms"] += e["ms"]
        cats[e["category"]]["launches"] += e["launches"]
    for c in cats.values():
        c["pct"] = 100 * c["ms"] / whole
    for e in names:
        e["pct"] = 100 * e["ms"] / whole
    return {"wall_ms": wall, "busy_ms": busy, "idle_ms": idle, "idle_pct": 100 * idle / whole,
            "kernel_ms": kernel_ms, "overlap_ms": max(kernel_ms - busy, 0.0),
            "launches": len(kernels) / steps,
            "gemm_ms": cats["gemm"]["ms"], "non_gemm_ms": wall - cats["gemm"]["ms"],
            "categories": cats, "top_kernels": names[:top],
            "unmatched": [e for e in names if e["category"] == OTHER][:unmatched]}
