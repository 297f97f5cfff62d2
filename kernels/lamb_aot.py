"""Ahead-of-time sm_90 builds of LAMB's Triton fallback (kernels/lamb.py), without a GPU, through
kernels/aot.py: what bench/results/aot/optim.json holds (`python bench/optim.py --compile-report`;
checked by tests/test_lamb_aot.py).

Rows: phase 1 per grad dtype and phase 2 per model-copy dtype as they launch (BLOCK, NUM_WARPS),
with 16-byte aligned addresses (`ALIGNED`: whole tensors, and ZeRO pieces whose starts are) and,
for float32, without (a ZeRO piece at an odd element); the per-slot finalize. Per row:
`instructions_per_iteration`, the SASS of the loop over full blocks (one thread's share of BLOCK
elements); `instructions_per_element` = that x threads / BLOCK; `bytes_per_param`, what the pass
reads and writes per element (the CUDA kernels' figures: phase 1 reads w, g, m, v and writes m, v;
phase 2 reads w, m, v and writes w and the copy).
"""

from __future__ import annotations

from bert_fast.kernels import aot, lamb

_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, None: 0}
_HYPER = ("eps", "weight_decay", "inv_bc1", "inv_bc2")


def _phase1(grad: str, aligned: bool) -> aot.AotSpec:
    sig = {"Table": "*i64", "Chunks": "*i64", "Clip": "*fp32", "Partial": "*fp32", "W0": "*fp32",
           "G0": f"*{grad}", "beta1": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
           "one_minus_beta2": "fp32", **{k: "fp32" for k in _HYPER}}
    flags = dict(ADAM_W_MODE=True, ALIGNED=aligned, BLOCK=lamb.BLOCK)
    return aot.AotSpec(lamb._lamb_phase1_kernel, sig, flags, lamb.NUM_WARPS, 3)


def _phase2(copy: str | None, aligned: bool) -> aot.AotSpec:
    sig = {"Table": "*i64", "Chunks": "*i64", "StepSizes": "*fp32", "W0": "*fp32",
           "C0": f"*{copy or 'fp32'}", **{k: "fp32" for k in _HYPER}}
    flags = dict(ADAM_W_MODE=True, HAS_COPY=copy is not None, ALIGNED=aligned, BLOCK=lamb.BLOCK)
    return aot.AotSpec(lamb._lamb_phase2_kernel, sig, flags, lamb.NUM_WARPS, 3)


def _finalize() -> aot.AotSpec:
    sig = {"Partial": "*fp32", "SlotBegin": "*i64", "Norms": "*fp32"}
    return aot.AotSpec(lamb._lamb_finalize_kernel, sig, dict(BLOCK=lamb.FINALIZE_BLOCK), 4, 3)


def specs() -> list[tuple[dict, aot.AotSpec]]:
    """(config columns, spec) of every row."""
    out = []
    for grad, aligned in (("fp32", True), ("bf16", True), ("fp16", True), ("fp32", False)):
        out.append((dict(kernel="phase1", dtype=grad, aligned=aligned,
                         bytes_per_param=4 + _SIZE[grad] + 8 + 8), _phase1(grad, aligned)))
    for copy, aligned in ((None, True), ("bf16", True), ("fp16", True), (None, False)):
        out.append((dict(kernel="phase2", dtype=copy or "fp32", aligned=aligned,
                         bytes_per_param=12 + 4 + _SIZE[copy]), _phase2(copy, aligned)))
    out.append((dict(kernel="finalize", dtype="fp32", aligned=True, bytes_per_param=0), _finalize()))
    return out


def optim_report() -> list[dict]:
    named = specs()
    rows = []
    for (config, spec), r in zip(named, aot.compile_reports([s for _, s in named])):
        block = spec.constexprs["BLOCK"]
        per_element = (None if r.instructions_per_iteration is None or config["kernel"] == "finalize"
                       else round(r.instructions_per_iteration * 32 * r.num_warps / block, 2))
        rows.append(dict(**config, block=block, num_warps=r.num_warps, registers=r.registers,
                         spills=r.spills, shared_bytes=r.shared_bytes,
                         instructions_per_iteration=r.instructions_per_iteration,
                         instructions_per_element=per_element))
    return rows
