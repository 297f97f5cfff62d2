"""Ahead-of-time sm_90 builds of the row kernels (LayerNorm, embeddings and their helpers) at BERT's
hidden sizes, as they launch (`row_norm.launch_config`), with and without dropout: what
bench/results/aot/{layernorm,embeddings}.json hold (`python bench/layernorm.py --compile-report`,
`python bench/embeddings.py --compile-report`; checked by tests/test_row_norm_aot.py).

A row kernel's time goes to its loop over row-pair tiles, which has no tensor-core instructions, so
`instructions_per_iteration` is the longest innermost loop (kernels/aot.py). Integer sizes are
marked divisible by 16, as Triton specialises them at BERT's hidden sizes."""

from __future__ import annotations

from bert_fast.kernels import aot
from bert_fast.kernels import embeddings as emb
from bert_fast.kernels import layernorm as ln
from bert_fast.kernels import row_norm as rn
from bert_fast.kernels import segment_sum as seg

HIDDEN = (768, 1024)
_TYPES = {"Rstd": "*fp32", "Mean": "*fp32", "Seed": "*i64", "Partial": "*fp32", "Head": "*fp32",
          "Tail": "*fp32", "SortedIds": "*i64", "Perm": "*i64", "InputIds": "*i64", "TokenTypeIds": "*i64",
          "PositionIds": "*i64",
          "eps": "fp32", "dropout_scale": "fp32", "scale0": "fp32", "scale1": "fp32", "scale2": "fp32"}


def _signature(fn, dtype: str) -> dict:
    fn = aot._unwrap(fn)
    constexprs = aot.constexpr_names(fn)
    return {name: _TYPES.get(name, f"*{dtype}" if name[0].isupper() else "i32")
            for name in fn.arg_names if name not in constexprs}


def _spec(fn, dtype: str, flags: dict, warps: int) -> aot.AotSpec:
    return aot.AotSpec(fn, _signature(fn, dtype), flags, warps, 1, divisible=("n_cols",))


def _row_specs(kernels: dict, extra: dict, dtype: str) -> list[tuple[str, int, bool, aot.AotSpec]]:
    """(kernel name, hidden, dropout, spec) for every row kernel of `kernels` at HIDDEN."""
    out = []
    for hidden in HIDDEN:
        config = rn.launch_config(hidden)
        warps = config.pop("num_warps")
        for drop in (False, True):
            for name, fn in kernels.items():
                flags = dict(HAS_DROPOUT=drop, **extra.get(name, {}), **config)
                out.append((name, hidden, drop, _spec(fn, dtype, flags, warps)))
    return out


def _rows(named, dtype: str) -> list[dict]:
    rows = []
    for (name, hidden, drop, spec), r in zip(named, aot.compile_reports([n[-1] for n in named])):
        c = spec.constexprs
        rows.append(dict(kernel=name, dtype=dtype, hidden=hidden, chunk=c.get("CHUNK"), chunks=c.get("K"),
                         rows_per_tile=2 * c["HALF"] if "HALF" in c else None, num_warps=r.num_warps,
                         dropout=drop, registers=r.registers, spills=r.spills, shared_bytes=r.shared_bytes,
                         instructions_per_iteration=r.instructions_per_iteration))
    return rows


def layernorm_report(dtype: str = "bf16") -> list[dict]:
    kernels = {"fwd": ln._add_layer_norm_fwd_kernel, "bwd": ln._add_layer_norm_bwd_kernel}
    extra = {"fwd": dict(HAS_X_BIAS=True, HAS_RESIDUAL=True, SAVE=True),
             "bwd": dict(HAS_X_BIAS=True, FROM_X=False)}
    named = _row_specs(kernels, extra, dtype)
    # A plain LayerNorm (the MLM head's): the backward reads x and the mean instead of x-hat.
    for hidden in HIDDEN:
        config = rn.launch_config(hidden)
        warps = config.pop("num_warps")
        flags = dict(HAS_X_BIAS=False, HAS_DROPOUT=False, FROM_X=True, **config)
        named.append(("bwd_plain", hidden, False, _spec(ln._add_layer_norm_bwd_kernel, dtype, flags, warps)))
    named.append(("finalize", 768, False, _spec(rn._finalize_kernel, dtype, dict(BLOCK_P=8, BLOCK_N=256), 4)))
    return _rows(named, dtype)


def embeddings_report(dtype: str = "bf16") -> list[dict]:
    kernels = {"fwd": emb._embeddings_fwd_kernel, "bwd": emb._embeddings_bwd_kernel}
    named = _row_specs(kernels, {"fwd": dict(SAVE=True)}, dtype)
    for name, fn, extra in (("segment_sum", seg._segment_block_kernel, {}),
                            ("segment_join", seg._segment_join_kernel, {"JOIN": 32})):
        named.append((name, 768, False, _spec(fn, dtype, dict(BLOCK_T=seg.BLOCK_T, BLOCK_H=64, **extra), 4)))
    return _rows(named, dtype)
