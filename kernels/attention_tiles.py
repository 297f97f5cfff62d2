"""Tiles for the attention kernels (kernels/attention.py, kernels/attention_bwd.py): the autotune
candidates per head_dim and dropout, and the constants both directions share.

The candidates are the configurations whose sm_90 builds neither spill nor exceed the static
targets, as read from their SASS (bench/results/aot/attention.json, rebuilt and checked by
tests/test_attention_aot.py); which of them is fastest at a shape is the autotuner's call on the
GPU. No cost formula: a candidate that starts to spill after a compiler update fails that test.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The interpreter's loop-bound fix (numpy >= 2.4) lives in kernels/__init__.py.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps,
                         num_stages=num_stages)


# (head_dim, dropout) -> candidates. The forward streams key tiles past BLOCK_M resident queries;
# 128 x 64 tiles with 8 warps give each warpgroup one 64-row wgmma and keep the dropout mask's
# 16-element Philox groups inside each thread (kernels/dropout.py wants tiles of 16 x 64 or more).
# 128 x 128 (one key tile at seq 128) needs 234 registers with dropout, so it is a candidate
# without dropout only. head_dim 128 needs 128 x 32 to stay under 255 registers.
_FWD = {
    16: ((128, 64, 8, 3), (64, 64, 4, 3)),
    32: ((128, 64, 8, 3), (64, 64, 4, 3)),
    64: ((128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3)),
    128: ((128, 32, 8, 3),),
}
_FWD_DROPOUT_EXCLUDED = {(128, 128, 8, 3)}
FWD_CONFIGS = {(d, drop): [_config(*c) for c in tiles if not (drop and c in _FWD_DROPOUT_EXCLUDED)]
               for d, tiles in _FWD.items() for drop in (False, True)}
# The fused backward: a program owns one (sequence, head); 64 keys stay on chip while 128-query
# tiles stream past (or, when the whole sequence fits one query tile, the queries stay and key
# tiles stream). At head_dim 128 the key-resident path spills 48-64 bytes: BERT's heads are 64.
BWD_CONFIGS = {(d, drop): [_config(128, 64, 8, 1)] for d in (16, 32, 64, 128) for drop in (False, True)}
# The interpreter (CPU tests) runs one small tile, so short test sequences span several blocks.
_INTERPRETER_CONFIG = _config(16, 16, 4, 1)


def candidates(kernel: str, head_dim: int, dropout: bool) -> list:
    """The autotune candidates of "fwd" or "bwd" for this head_dim and dropout setting."""
    if _INTERPRET:
        return [_INTERPRETER_CONFIG]
    return (FWD_CONFIGS if kernel == "fwd" else BWD_CONFIGS)[(head_dim, dropout)]


# BERT_FAST_AUTOTUNE=0 runs only the first candidate: the GPU tests check numerics, not tuning,
# and their sweep of shapes would otherwise compile every candidate of every key.
_AUTOTUNE = os.environ.get("BERT_FAST_AUTOTUNE", "1") != "0"


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        keep = candidates(kernel, args["HEAD_DIM"], bool(args["HAS_DROPOUT"]))
        wanted = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in keep}
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages) in wanted]
        return kept if _AUTOTUNE else kept[:1]
    return prune


def _all(table: dict) -> list:
    seen, out = set(), []
    for configs in table.values():
        for c in configs:
            key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def autotuned(kernel_fn, kernel: str, heuristics: dict | None = None):
    """Autotune (+ heuristics) around a bare @triton.jit kernel, which keeps its own module name
    so kernels/attention_aot.py can compile it for sm_90."""
    configs = [_INTERPRETER_CONFIG] if _INTERPRET else _all(FWD_CONFIGS if kernel == "fwd" else BWD_CONFIGS)
    inner = triton.heuristics(heuristics)(kernel_fn) if heuristics else kernel_fn
    return triton.autotune(configs, key=["HEAD_DIM", "seqlen_bucket", "HAS_DROPOUT"],
                           prune_configs_by={"early_config_prune": _pruner(kernel)})(inner)
