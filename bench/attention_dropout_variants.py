"""Two ways to give the attention backward its dropout mask, compared statically (issue 18): the
sm_90 SASS of both, no GPU needed. Writes bench/results/aot/attention_dropout_variants.json and
prints a table.

    python bench/attention_dropout_variants.py [--out DIR]

- `regenerate` (what kernels/attention*.py run): the forward draws the mask (kernels/dropout.py)
  and one fused backward kernel draws it again, once, beside FlashAttention-2's five GEMMs.
- `stored`: the forward draws the mask once and stores it, one bit per score (12.6 MB per layer
  at 32 x 512 x 12 heads); the backward, split in a dK/dV kernel (keys resident, [keys, queries]
  tiles) and a dQ kernel (queries resident) as FlashAttention-2 does without atomics, reads the
  bits instead of drawing them, but recomputes S and dP in both: seven GEMMs.
The kernels of `stored` below exist for this comparison only; they are built, never run.

Compared per score element: SASS instructions one thread issues per loop iteration, times the
threads, over the tile's scores; plus GEMMs and the mask's memory traffic. The score tile is
[BLOCK_M, BLOCK_N] = 128 x 64 with 8 warps for every kernel except `stored`'s dK/dV, which keeps
the old split kernel's 32 x 128 (its transposed tile at 128 x 64 needs more than 255 registers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import triton
import triton.language as tl

from bert_fast.kernels import aot, dropout
from bert_fast.kernels.attention_aot import report as attention_report

OUT = Path(__file__).resolve().parent / "results" / "aot"


@triton.jit
def _stored_fwd_kernel(Q, K, V, Out, Lse, CuSeqlens, Seed, Mask,
                       stride_tok, stride_head, stride_mask_row, num_heads, qk_scale, threshold,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward with dropout that also stores the keep bits: Mask[h * T + row, key // 32]."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads
    off_h = (off_bh % num_heads).to(tl.int64)
    seq_start = tl.load(CuSeqlens + off_b).to(tl.int64)
    seqlen = tl.load(CuSeqlens + off_b + 1) - seq_start.to(tl.int32)
    q_base = start_m * BLOCK_M
    offs_m = q_base + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = seq_start + offs_m
    q = tl.load(Q + rows[:, None] * stride_tok + off_h * stride_head + offs_d[None, :])
    K += seq_start * stride_tok + off_h * stride_head
    V += seq_start * stride_tok + off_h * stride_head
    seed_lo, seed_hi = dropout.seed_words(Seed)
    t_low, t_top_clear = dropout.threshold_words(threshold)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bit = tl.arange(0, 32)
    for start_n in range(0, (seqlen // BLOCK_N) * BLOCK_N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(K + offs_n[None, :] * stride_tok + offs_d[:, None])
        v = tl.load(V + offs_n[:, None] * stride_tok + offs_d[None, :])
        s = tl.dot(q, kt) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        flags, byte = dropout.tile_flags(seed_lo, seed_hi, off_bh.to(tl.uint32), 0, t_low, t_top_clear,
                                         q_base, tl.arange(0, BLOCK_M), start_n, tl.arange(0, BLOCK_N))
        keep = dropout.kept(flags, byte)
        words = tl.sum(tl.reshape(keep.to(tl.int32), [BLOCK_M, BLOCK_N // 32, 32]) << bit, axis=2)
        word_cols = start_n // 32 + tl.arange(0, BLOCK_N // 32)
        tl.store(Mask + (off_h * 0 + rows)[:, None] * stride_mask_row + word_cols[None, :], words)
        acc = tl.dot(dropout.apply(p.to(v.dtype), flags, byte), v, acc)
        m_i = m_new
    tl.store(Out + rows[:, None] * stride_tok + off_h * stride_head + offs_d[None, :],
             (acc / l_i[:, None]).to(Out.dtype.element_ty))
    tl.store(Lse + off_h * 0 + rows, m_i + tl.math.log2(l_i))


@triton.jit
def _stored_keep(Mask, stride_mask_row, queries, keys):
    """Keep bits of (query, key) pairs, any tile orientation: word key // 32 of the query's row."""
    words = tl.load(Mask + queries * stride_mask_row + keys // 32)
    return ((words >> (keys % 32)) & 1) != 0


@triton.jit
def _stored_bwd_dkdv_kernel(Q, K, V, DOut, DK, DV, Lse, Delta, CuSeqlens, Mask,
                            stride_tok, stride_head, stride_mask_row, num_heads, qk_scale, dropout_scale,
                            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The old split dK/dV kernel ([keys, queries] tiles) reading the stored bits."""
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads
    off_h = (off_bh % num_heads).to(tl.int64)
    seq_start = tl.load(CuSeqlens + off_b).to(tl.int64)
    seqlen = tl.load(CuSeqlens + off_b + 1) - seq_start.to(tl.int32)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = seq_start + offs_n
    k = tl.load(K + keys[:, None] * stride_tok + off_h * stride_head + offs_d[None, :])
    v = tl.load(V + keys[:, None] * stride_tok + off_h * stride_head + offs_d[None, :])
    Q += seq_start * stride_tok + off_h * stride_head
    DOut += seq_start * stride_tok + off_h * stride_head
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qt = tl.load(Q + offs_m[None, :] * stride_tok + offs_d[:, None])
        do = tl.load(DOut + offs_m[:, None] * stride_tok + offs_d[None, :])
        lse = tl.load(Lse + seq_start + offs_m)
        delta = tl.load(Delta + seq_start + offs_m)
        pt = tl.math.exp2(tl.dot(k, qt) * qk_scale - lse[None, :])
        dpt = tl.dot(v, tl.trans(do))
        keep = _stored_keep(Mask, stride_mask_row, (seq_start + offs_m)[None, :], offs_n[:, None])
        pt_drop = tl.where(keep, pt, 0.0)
        dv = tl.dot(pt_drop.to(do.dtype), do, dv)
        dst = pt_drop * dpt - pt * (delta * (1.0 / dropout_scale))[None, :]
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)
    out = keys[:, None] * stride_tok + off_h * stride_head + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty))
    tl.store(DV + out, dv.to(DV.dtype.element_ty))


@triton.jit
def _stored_bwd_dq_kernel(Q, K, V, DOut, DQ, Lse, Delta, CuSeqlens, Mask,
                          stride_tok, stride_head, stride_mask_row, num_heads, qk_scale, dropout_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The old split dQ kernel ([queries, keys] tiles) reading the stored bits."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads
    off_h = (off_bh % num_heads).to(tl.int64)
    seq_start = tl.load(CuSeqlens + off_b).to(tl.int64)
    seqlen = tl.load(CuSeqlens + off_b + 1) - seq_start.to(tl.int32)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = seq_start + offs_m
    q = tl.load(Q + rows[:, None] * stride_tok + off_h * stride_head + offs_d[None, :])
    do = tl.load(DOut + rows[:, None] * stride_tok + off_h * stride_head + offs_d[None, :])
    lse = tl.load(Lse + rows)
    delta = tl.load(Delta + rows) * (1.0 / dropout_scale)
    K += seq_start * stride_tok + off_h * stride_head
    V += seq_start * stride_tok + off_h * stride_head
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, (seqlen // BLOCK_N) * BLOCK_N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(K + offs_n[None, :] * stride_tok + offs_d[:, None])
        vt = tl.load(V + offs_n[None, :] * stride_tok + offs_d[:, None])
        p = tl.math.exp2(tl.dot(q, kt) * qk_scale - lse[:, None])
        dp = tl.dot(do, vt)
        keep = _stored_keep(Mask, stride_mask_row, rows[:, None], offs_n[None, :])
        ds = tl.where(keep, p, 0.0) * dp - p * delta[:, None]
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq)
    out = rows[:, None] * stride_tok + off_h * stride_head + offs_d[None, :]
    tl.store(DQ + out, dq.to(DQ.dtype.element_ty))


_POINTERS = {"Lse": "*fp32", "Delta": "*fp32", "CuSeqlens": "*i32", "Seed": "*i64", "Mask": "*i32"}
_FLOATS = ("qk_scale", "dropout_scale")
# variant, kernel, fn, BLOCK_M, BLOCK_N, warps, stages, GEMMs per score tile
_STORED = [("stored", "fwd (draws, stores bits)", _stored_fwd_kernel, 128, 64, 8, 3, 2),
           ("stored", "bwd dK/dV (reads bits)", _stored_bwd_dkdv_kernel, 32, 128, 8, 3, 4),
           ("stored", "bwd dQ (reads bits)", _stored_bwd_dq_kernel, 128, 64, 8, 3, 3)]


def _signature(fn) -> dict:
    fn = aot._unwrap(fn)
    constexprs = aot.constexpr_names(fn)
    return {name: _POINTERS.get(name, "fp32" if name in _FLOATS else "*bf16" if name[0].isupper() else "i32")
            for name in fn.arg_names if name not in constexprs}


def _per_score(instructions: int, block_m: int, block_n: int, warps: int) -> float:
    return instructions * 32 * warps / (block_m * block_n)


def report() -> list[dict]:
    specs = [aot.AotSpec(fn, _signature(fn), dict(HEAD_DIM=64, BLOCK_M=m, BLOCK_N=n), w, st)
             for _, _, fn, m, n, w, st, _ in _STORED]
    rows = []
    for (variant, name, _, m, n, w, st, gemms), r in zip(_STORED, aot.compile_reports(specs)):
        rows.append(dict(variant=variant, kernel=name, block_m=m, block_n=n, num_warps=w, num_stages=st,
                         registers=r.registers, spills=r.spills, gemms=gemms,
                         instructions_per_iteration=r.instructions_per_iteration,
                         instructions_per_score=round(_per_score(r.instructions_per_iteration, m, n, w), 2)))
    chosen = {(r["kernel"], r["dropout"]): r for r in attention_report("bf16", ((64, True),))
              if r["block_m"] == 128 and r["block_n"] == 64 and r["num_stages"] in (1, 3)}
    for key, name, gemms, loop in (("fwd", "fwd (draws)", 2, 0), ("bwd", "bwd fused (draws again)", 5, 2)):
        r = chosen[(key, True)]
        ipi = r["mma_loops"][loop]  # the backward's middle key tiles: the steady state at seq 512
        rows.append(dict(variant="regenerate", kernel=name, block_m=128, block_n=64,
                         num_warps=r["num_warps"], num_stages=r["num_stages"], registers=r["registers"],
                         spills=r["spills"], gemms=gemms, instructions_per_iteration=ipi,
                         instructions_per_score=round(_per_score(ipi, 128, 64, r["num_warps"]), 2)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = report()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "attention_dropout_variants.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)
    print("| variant | kernel | tile | warps | registers | spills | GEMMs | instructions / iteration | "
          "instructions / score |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['kernel']} | {r['block_m']} x {r['block_n']} | {r['num_warps']} | "
              f"{r['registers']} | {r['spills']} | {r['gemms']} | {r['instructions_per_iteration']} | "
              f"{r['instructions_per_score']} |")
    for variant in ("stored", "regenerate"):
        total = sum(r["instructions_per_score"] for r in rows if r["variant"] == variant)
        gemms = sum(r["gemms"] for r in rows if r["variant"] == variant)
        print(f"{variant}: {total:.1f} instructions per score element (forward + backward), {gemms} GEMMs")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
