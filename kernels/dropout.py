"""Dropout masks for every kernel: one Philox4x32-7 call decides 16 elements.

Why not `tl.rand`: it runs a whole 10-round Philox per element and keeps one of its four 32-bit
outputs, which made the attention kernels' inner loops 4-9x longer with dropout than without
(bench/results/aot/attention.json has the before and after). Here one call yields 128 random
bits, cut into 16 bytes, and each byte decides one element: keep when byte >= t, t = round(p * 256).

- **Rounds**: 7. Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011), Table 2,
  report Philox4x32-7 as the fewest rounds that pass TestU01's BigCrush (Crush-resistant); 10 is
  their margin. FlashAttention-2 draws its dropout masks from 7 rounds as well.
- **Multiplications**: each round's two 32x32 -> 64-bit products are written as one 64-bit
  multiply, which the compiler emits as a single IMAD.WIDE.U32 giving both halves.
- **Keep probability**: p is rounded to a multiple of 1/256 (FlashAttention-2 rounds it too);
  kernels scale kept values by 1 / (1 - p_used), so the expectation is exact. `keep_threshold` and
  `dropout_scale` give t and that scale; p = 0.1 runs as 26/256 = 0.1016.
- **Compare**: the 4 bytes of a word are compared with t at once (SWAR: 3 integer ops per word,
  the most significant bit of each result byte is the decision); applying it is a byte permute
  (PRMT, replicating that bit) and an AND per element, or per pair of 16-bit elements.
- **Which byte**: two layouts, each a fixed function of (row, column), so forward, backward and
  `keep_mask` agree whatever tiles they use, and each puts a call's 16 elements in one thread:
  - `tile_flags` (attention's [queries, keys] score tiles): element (r, c) uses the call with
    counter (r & ~8, c & ~56, stream, site) and byte ((r >> 3) & 1, (c >> 3) & 7) of it. A
    Hopper/Ampere MMA accumulator gives each thread rows r and r + 8 and columns c + 8j, so the
    16 elements of a call live in one thread whenever the tile is at least 16 x 64.
  - `row_pair_flags` (row-major activations [tokens, hidden]: LayerNorm, embeddings): counter
    (r & ~1, c & ~7, stream, site) and byte (r & 1, c & 7): 8 consecutive columns of two adjacent
    rows. Row kernels load 8 consecutive 16-bit values per thread (one 16-byte vector) and process
    a row pair as two tiles of one layout, so the pair's two 8-element vectors share one thread.
  Any other tile shape gives the same mask, only with repeated calls. `stream` separates
  sequences and heads (b * heads + h), `site` separates call sites (layers, and the LayerNorms and
  attention within one); the key is a 64-bit seed drawn once per forward pass from torch's
  generator, so steps differ and `torch.manual_seed` reproduces them.

The masks are never stored: forward and backward regenerate them. `keep_mask` (tests) draws a
whole mask through the same `tile_flags` with the plain-Triton apply path; the kernels apply it
with inline PTX on the GPU (`_USE_ASM`), so GPU tests against `keep_mask` check that path too.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

N_ROUNDS = tl.constexpr(7)
_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
_PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
# The interpreter cannot run PTX: it applies the same decisions with plain Triton ops.
_USE_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@functools.cache
def keep_threshold(p: float) -> int:
    """t in 0..255: an element is dropped when its random byte is below t (0 = no dropout)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
    return min(255, max(1, round(p * 256))) if p > 0 else 0


@functools.cache
def dropout_scale(p: float) -> float:
    """1 / (1 - p_used), with p_used = keep_threshold(p) / 256 the rate the kernels really drop."""
    return 256.0 / (256 - keep_threshold(p))


def new_seed(device: torch.device) -> torch.Tensor:
    """A [1] int64 Philox key on `device` from torch's generator (no host sync): one per forward."""
    return torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=device)


@triton.jit
def _mulhilo(a, B: tl.constexpr):
    product = a.to(tl.uint64) * B
    return (product >> 32).to(tl.uint32), product.to(tl.uint32)


@triton.jit
def philox(k0, k1, c0, c1, c2, c3):
    """Philox4x32-7 of counter (c0, c1, c2, c3) under key (k0, k1), all uint32."""
    for _ in tl.static_range(N_ROUNDS):
        hi0, lo0 = _mulhilo(c0, _PHILOX_ROUND_A)
        hi2, lo2 = _mulhilo(c2, _PHILOX_ROUND_B)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 += _PHILOX_KEY_A
        k1 += _PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def seed_words(Seed):
    """The two key words of the [1] int64 seed tensor."""
    seed = tl.load(Seed)
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def threshold_words(threshold):
    """The constants of `_bytes_at_least` for byte threshold t (an int32 scalar in 0..255)."""
    t = threshold.to(tl.uint32)
    return (0x80 - (t & 0x7F)) * 0x01010101, ((t & 0x80) ^ 0x80) * 0x01010101


@triton.jit
def _bytes_at_least(w, t_low, t_top_clear):
    """Per byte of w, most significant bit = (byte >= t); the other bits are don't-cares.
    (w & 0x7f) + 0x80 - (t & 0x7f) stays within its byte and has its top bit set iff the low 7
    bits compare >=; the top bits decide when they differ: with F = NOT (top bit of t), the answer
    is (w7 AND F) OR ((w7 XOR F) AND low >=). A borrow-free byte-wise compare in 3 ops."""
    d = (w & 0x7F7F7F7F) + t_low
    return (w & t_top_clear) | ((w ^ t_top_clear) & d)


@triton.jit
def tile_flags(seed_lo, seed_hi, stream, site, t_low, t_top_clear, row_base, rows, col_base, cols):
    """Decision words for a [R, C] tile whose element (i, j) is (row_base + rows[i], col_base +
    cols[j]): returns (flags [R, C] uint32, byte [R, C] int32); the element is kept iff bit
    8 * byte + 7 of its flags is set. `rows`/`cols` are the tile's aranges; when R % 16 == 0,
    C % 64 == 0 and the bases are multiples of R and C (tiles of a grid), the counters are built
    from the aranges alone so the compiler sees which elements share a Philox call."""
    r_off = rows[:, None]
    c_off = cols[None, :]
    if (rows.shape[0] % 16 == 0) and (cols.shape[0] % 64 == 0):
        c0 = row_base + (r_off & ~8)
        c1 = col_base + (c_off & ~56)
        r_bits = r_off
        c_bits = c_off
    else:
        r_bits = row_base + r_off
        c_bits = col_base + c_off
        c0 = r_bits & ~8
        c1 = c_bits & ~56
    c0 = c0.to(tl.uint32)
    c1 = c1.to(tl.uint32)
    zero = tl.zeros_like(c0) + tl.zeros_like(c1)
    r0, r1, r2, r3 = philox(seed_lo, seed_hi, c0 + zero, c1 + zero, zero + stream, zero + site)
    word = ((r_bits >> 2) & 2) | ((c_bits >> 5) & 1)
    w = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return _bytes_at_least(w, t_low, t_top_clear), (c_bits >> 3) & 3


@triton.jit
def row_pair_flags(seed_lo, seed_hi, stream, site, t_low, t_top_clear, rows, cols):
    """Decision words for the elements (rows[i], cols[j]) of a row-major activation, rows and cols
    absolute indices: (flags [R, C] uint32, byte [R, C] int32), as `tile_flags` returns them."""
    r = rows[:, None]
    c = cols[None, :]
    c0 = (r & ~1).to(tl.uint32)
    c1 = (c & ~7).to(tl.uint32)
    zero = tl.zeros_like(c0) + tl.zeros_like(c1)
    r0, r1, r2, r3 = philox(seed_lo, seed_hi, c0 + zero, c1 + zero, zero + stream, zero + site)
    word = ((r & 1) << 1) | ((c >> 2) & 1)
    w = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return _bytes_at_least(w, t_low, t_top_clear), c & 3


@triton.jit
def kept(flags, byte):
    """The keep decision as a boolean tile (tests and the plain apply path)."""
    return ((flags >> (byte * 8 + 7).to(tl.uint32)) & 1) != 0


# One PRMT turns a decision bit into an all-ones or all-zero mask for an AND. Operands: $1 the
# value(s), then each element's flags word, then each element's selector (tests/test_dropout_rng.py
# runs these strings through a PRMT model for every byte and decision).
APPLY_32_PTX = tl.constexpr("{ .reg .b32 %m; prmt.b32 %m, $2, $2, $3; and.b32 $0, $1, %m; }")
# A packed pair of 16-bit elements: the mask's bytes 0-1 copy the sign of byte b0 of flags0 and its
# bytes 2-3 that of byte b1 of flags1 (source bytes 4-7). Each element's selector holds both
# candidate nibble bytes, built from its own byte outside the asm (so a loop whose bytes do not
# change builds them once); the first PRMT takes byte 0 from the first element, byte 1 from the second.
APPLY_16_PTX = tl.constexpr("{ .reg .b32 %m, %s; prmt.b32 %s, $4, $5, 0x50; prmt.b32 %m, $2, $3, %s; "
                            "and.b32 $0, $1, %m; }")


@triton.jit
def selector_32(byte):
    return (byte | 8) * 0x1111


@triton.jit
def selector_16(byte):
    half = (byte | 8) * 0x11
    return half | ((half + 0x44) << 8)


@triton.jit
def apply(x, flags, byte):
    """x with dropped elements set to 0 (no scaling: callers fold 1 / (1 - p) where it is free).
    16-bit tiles are masked two elements at a time, as they sit packed in one register."""
    if _USE_ASM:
        if x.dtype.primitive_bitwidth == 32:
            return tl.inline_asm_elementwise(APPLY_32_PTX, "=r,r,r,r", [x, flags, selector_32(byte)],
                                             dtype=x.dtype, is_pure=True, pack=1)
        else:
            tl.static_assert(x.dtype.primitive_bitwidth == 16, "dropout.apply takes 16- or 32-bit tiles")
            return tl.inline_asm_elementwise(APPLY_16_PTX, "=r,r,r,r,r,r", [x, flags, selector_16(byte)],
                                             dtype=x.dtype, is_pure=True, pack=2)
    else:
        return tl.where(kept(flags, byte), x, tl.zeros_like(x))


@triton.jit
def _keep_mask_kernel(
    Keep,  # [rows, cols] int8
    Seed,  # [1] int64
    stream, site, threshold, rows, cols,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROW_PAIRS: tl.constexpr,
):
    row_base = tl.program_id(0) * BLOCK_R
    col_base = tl.program_id(1) * BLOCK_C
    seed_lo, seed_hi = seed_words(Seed)
    t_low, t_top_clear = threshold_words(threshold)
    r = tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    if ROW_PAIRS:
        flags, byte = row_pair_flags(seed_lo, seed_hi, stream, site, t_low, t_top_clear, row_base + r,
                                     col_base + c)
    else:
        flags, byte = tile_flags(seed_lo, seed_hi, stream, site, t_low, t_top_clear, row_base, r, col_base, c)
    mask = ((row_base + r)[:, None] < rows) & ((col_base + c)[None, :] < cols)
    tl.store(Keep + (row_base + r)[:, None] * cols + (col_base + c)[None, :], kept(flags, byte).to(tl.int8),
             mask=mask)


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, *, stream: int = 0, site: int = 0,
              block: tuple[int, int] = (16, 64), row_pairs: bool = False) -> torch.Tensor:
    """The bool [rows, cols] keep-mask the kernels draw for (stream, site) under `seed`, in the
    score-tile layout (attention) or with `row_pairs` the row-major one (LayerNorm, embeddings).
    Tests only: kernels never store it. `block` changes how it is computed, never the mask."""
    keep = torch.empty((rows, cols), dtype=torch.int8, device=seed.device)
    if rows and cols:
        grid = (triton.cdiv(rows, block[0]), triton.cdiv(cols, block[1]))
        _keep_mask_kernel[grid](keep, seed, stream, site, keep_threshold(p), rows, cols,
                                BLOCK_R=block[0], BLOCK_C=block[1], ROW_PAIRS=row_pairs)
    return keep.bool()
