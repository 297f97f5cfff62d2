"""Tiles for the attention kernels (kernels/attention.py, kernels/attention_bwd.py): the
autotune candidates for Hopper at BERT shapes, the register budget that prunes those whose sm_90
builds spill, and the device helpers forward and backward share (log2(e), the dropout draw).
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


# Hopper candidates at BERT shapes (head_dim 64, seq 128 and 512), also what the AOT builds check.
FWD_CONFIGS = [_config(m, n, w, s) for m, n, w, s in (
    (64, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3),
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3))]
# dK/dV: BLOCK_N keys stay on chip while BLOCK_M query tiles stream past.
BWD_KV_CONFIGS = [_config(m, n, w, s) for m, n, w, s in (
    (16, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3),
    (64, 128, 8, 2))]
# dQ: BLOCK_M queries stay on chip while BLOCK_N key tiles stream past.
BWD_Q_CONFIGS = [_config(m, n, w, s) for m, n, w, s in (
    (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2))]
# The interpreter (CPU tests) runs one small tile, so short test sequences span several blocks.
_INTERPRETER_CONFIGS = [_config(16, 16, 4, 1)]

# Register pressure per thread of a config, in tile elements: the [BLOCK_M, BLOCK_N] scores, the
# float32 accumulators ([BLOCK_M, D] for out and dQ, [BLOCK_N, D] twice for dK and dV) and the tile
# that streams through the loop (K/V, or Q/dO for dK/dV), whose addresses live in registers.
# Philox needs room of its own, so dropout gets the smaller budget. The budgets separate the
# configs whose sm_90 builds spill from those that do not (tests/test_attention.py rebuilds them).
_TILE_COST = {
    "fwd": lambda m, n, d: m * n + m * d + n * d,
    "bwd_dkdv": lambda m, n, d: m * n + 2 * n * d + m * d,
    "bwd_dq": lambda m, n, d: m * n + m * d + n * d,
}
_BUDGET = {False: 160, True: 96}


def _cost(kernel: str, config, head_dim: int) -> float:
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return _TILE_COST[kernel](m, n, head_dim) / (32 * config.num_warps)


def kept_configs(kernel: str, configs, head_dim: int, dropout: bool) -> list:
    """The configs the autotuner tries: those within budget, else the single cheapest."""
    fits = [c for c in configs if _cost(kernel, c, head_dim) <= _BUDGET[dropout]]
    return fits or [min(configs, key=lambda c: _cost(kernel, c, head_dim))]


# BERT_FAST_AUTOTUNE=0 runs only the first kept config: the GPU tests check numerics, not tuning,
# and their sweep of shapes would otherwise compile every candidate of every key (~200 builds).
_AUTOTUNE = os.environ.get("BERT_FAST_AUTOTUNE", "1") != "0"


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = kept_configs(kernel, configs, args["HEAD_DIM"], args["dropout_p"] > 0)
        return kept if _AUTOTUNE else kept[:1]
    return prune


_HEURISTICS = {"HAS_DROPOUT": lambda args: args["dropout_p"] > 0.0}


@triton.jit
def _dropout_keep(seed, rng_row, offs_n, dropout_p):
    """Which of a tile's probabilities dropout keeps: one Philox draw per (query row, key)."""
    return tl.rand(seed, rng_row[:, None] + offs_n[None, :]) >= dropout_p


def _autotuned(kernel, name: str, configs):
    """Autotune + heuristics around a bare @triton.jit kernel, which keeps its own module name so
    kernels/attention_aot.py can compile it for sm_90."""
    return triton.autotune(configs, key=["HEAD_DIM", "seqlen_bucket", "dropout_p"],
                           prune_configs_by={"early_config_prune": _pruner(name)})(
        triton.heuristics(_HEURISTICS)(kernel))
