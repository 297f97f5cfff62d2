"""Ahead-of-time sm_90 builds of every attention kernel configuration the autotuner keeps (tests
and `bench/attention.py --compile-report`), without a GPU, through kernels/aot.py.

Pointers and strides are marked divisible by 16 (aot's default), which `attention_varlen`
guarantees at run time (it copies inputs that are not), so the builds are the kernels that run.
"""

from __future__ import annotations

from bert_fast.kernels import aot
from bert_fast.kernels import attention as attn

_KERNELS = {
    "fwd": (attn._attn_fwd_kernel, attn.FWD_CONFIGS),
    "bwd_dkdv": (attn._attn_bwd_dkdv_kernel, attn.BWD_KV_CONFIGS),
    "bwd_dq": (attn._attn_bwd_dq_kernel, attn.BWD_Q_CONFIGS),
}
_FLOATS = ("qk_scale", "sm_scale", "dropout_p")
_POINTERS = {"Lse": "*fp32", "Delta": "*fp32", "CuSeqlens": "*i32", "Seed": "*i64"}


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


def specs(dtype: str = "bf16", head_dim: int = 64, dropout: bool = False) -> list[aot.AotSpec]:
    """Every autotune config of the three main kernels that the autotuner keeps for this head_dim
    and dropout setting."""
    flags = dict(HEAD_DIM=head_dim, HAS_DROPOUT=dropout,
                 INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    out = []
    for name, (fn, configs) in _KERNELS.items():
        for config in attn.kept_configs(name, configs, head_dim, dropout):
            out.append(aot.AotSpec(fn, _signature(fn, dtype), {**flags, **config.kwargs},
                                   config.num_warps, config.num_stages))
    return out


VARIANTS = ((64, False), (64, True), (128, False), (128, True))  # (head_dim, dropout)


def compile_table(dtype: str = "bf16", variants=VARIANTS, arch: int = 90) -> list[aot.AotReport]:
    """Reports for `specs(dtype, head_dim, dropout)` of every variant."""
    return aot.compile_reports([spec for head_dim, dropout in variants
                                for spec in specs(dtype, head_dim, dropout)], arch)
