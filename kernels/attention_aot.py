"""Ahead-of-time sm_90 builds of every attention kernel configuration the autotuner may pick
(tests and `bench/attention.py --compile-report`), without a GPU, through kernels/aot.py.

Pointers and strides are marked divisible by 16 (aot's default), which `attention_varlen`
guarantees at run time (it copies inputs that are not), so the builds are the kernels that run.
`report` gives one row per kernel variant and config: what bench/results/aot/attention.json holds.
`instructions_per_iteration` is the first loop over full tiles (aot.inner_loop_instructions);
`mma_loops` lists every tensor-core loop in program order: the forward's full and masked key
tiles; the backward's queries-resident loop, then its first, middle and last key tiles.
"""

from __future__ import annotations

from bert_fast.kernels import aot
from bert_fast.kernels import attention as attn
from bert_fast.kernels.attention_tiles import BWD_CONFIGS, FWD_CONFIGS

# Report name -> (kernel, candidate table, constexprs set by the launcher or a heuristic).
_KERNELS = {
    "fwd": (attn._attn_fwd_kernel, FWD_CONFIGS, {}),
    "bwd": (attn._attn_bwd_kernel, BWD_CONFIGS, {"ONE_Q_BLOCK": False}),
    "bwd_one_q_block": (attn._attn_bwd_kernel, BWD_CONFIGS, {"ONE_Q_BLOCK": True}),
}
_FLOATS = ("qk_scale", "sm_scale", "dropout_scale")
_POINTERS = {"Lse": "*fp32", "Delta": "*fp32", "DQAcc": "*fp32", "CuSeqlens": "*i32", "Seed": "*i64"}
VARIANTS = ((64, False), (64, True))  # (head_dim, dropout): BERT's head size, as trained and evaluated


def _signature(fn, dtype: str) -> dict:
    """Triton types of the non-constexpr arguments: tensors by name, ints and floats by kind."""
    fn = aot._unwrap(fn)
    constexprs = aot.constexpr_names(fn)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in _FLOATS:
            signature[name] = "fp32"
        elif name in _POINTERS:
            signature[name] = _POINTERS[name]
        elif name[0].isupper():
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "i32"
    return signature


def specs(dtype: str = "bf16", head_dim: int = 64, dropout: bool = False) -> list[tuple[str, aot.AotSpec]]:
    """(report name, spec) for every candidate of every kernel variant at this head_dim/dropout."""
    flags = dict(HEAD_DIM=head_dim, HAS_DROPOUT=dropout,
                 INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    out = []
    for name, (fn, table, extra) in _KERNELS.items():
        for config in table[(head_dim, dropout)]:
            out.append((name, aot.AotSpec(fn, _signature(fn, dtype), {**flags, **extra, **config.kwargs},
                                          config.num_warps, config.num_stages)))
    return out


def report(dtype: str = "bf16", variants=VARIANTS, arch: int = 90) -> list[dict]:
    """One row per kernel variant, config and dropout setting, in the layout of
    bench/results/aot/attention.json."""
    named = [item for head_dim, drop in variants for item in specs(dtype, head_dim, drop)]
    reports = aot.compile_reports([spec for _, spec in named], arch)
    rows = []
    for (name, spec), r in zip(named, reports):
        c = spec.constexprs
        rows.append(dict(kernel=name, head_dim=c["HEAD_DIM"], dtype=dtype, block_m=c["BLOCK_M"],
                         block_n=c["BLOCK_N"], num_warps=r.num_warps, num_stages=r.num_stages,
                         dropout=bool(c["HAS_DROPOUT"]), registers=r.registers, spills=r.spills,
                         shared_bytes=r.shared_bytes, uses_wgmma=r.uses_wgmma,
                         instructions_per_iteration=r.instructions_per_iteration,
                         mma_loops=r.mma_loops))
    return rows
