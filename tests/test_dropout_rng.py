"""kernels/dropout.py, the dropout RNG every kernel shares, under the Triton interpreter: Philox4x32-7
against Random123's published answers, the byte compare against every (byte, threshold) pair, the
mask against a plain-Python rebuild of its definition, and its statistics.

The statistical tests use fixed seeds, so each either always passes or always fails; the bounds
say how often a true Bernoulli source would fail them, so a failure means a real defect (a
collision of counters, a biased byte, a broken bit mapping), not bad luck."""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from bert_fast.kernels import dropout

MASK32 = 0xFFFFFFFF


@triton.jit
def _philox_words_kernel(Out, c0, c1, c2, c3, k0, k1):
    one = tl.zeros([1], tl.uint32)
    r0, r1, r2, r3 = dropout.philox(k0.to(tl.uint32), k1.to(tl.uint32), one + c0.to(tl.uint32),
                                    one + c1.to(tl.uint32), one + c2.to(tl.uint32), one + c3.to(tl.uint32))
    tl.store(Out + tl.arange(0, 1), r0.to(tl.int64))
    tl.store(Out + 1 + tl.arange(0, 1), r1.to(tl.int64))
    tl.store(Out + 2 + tl.arange(0, 1), r2.to(tl.int64))
    tl.store(Out + 3 + tl.arange(0, 1), r3.to(tl.int64))


def philox_words(counter, key) -> list[int]:
    out = torch.zeros(4, dtype=torch.int64)
    _philox_words_kernel[(1,)](out, *counter, *key)
    return [int(x) & MASK32 for x in out]


# Random123's kat_vectors, "philox4x32 7": counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_matches_random123_known_answers(counter, key, expected):
    assert philox_words(counter, key) == list(expected)


def philox_reference(c0, c1, c2, c3, k0, k1):
    """Philox4x32-7 in plain Python (Salmon et al. 2011), for vectors of counters."""
    c = [np.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(7):
        p0 = np.uint64(0xD2511F53) * c[0]
        p2 = np.uint64(0xCD9E8D57) * c[2]
        c = [((p2 >> np.uint64(32)) ^ c[1] ^ k0) & np.uint64(MASK32), p2 & np.uint64(MASK32),
             ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & np.uint64(MASK32), p0 & np.uint64(MASK32)]
        k0 = (k0 + np.uint64(0x9E3779B9)) & np.uint64(MASK32)
        k1 = (k1 + np.uint64(0xBB67AE85)) & np.uint64(MASK32)
    return c


def mask_reference(seed: int, rows: int, cols: int, p: float, stream: int, site: int) -> torch.Tensor:
    """The documented definition: element (r, c) takes byte ((r >> 3) & 1) * 8 + ((c >> 3) & 7)
    of the call with counter (r & ~8, c & ~56, stream, site) and keeps when it is >= t."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    words = philox_reference(r & ~8, c & ~56, np.full_like(r, stream), np.full_like(r, site),
                             seed & MASK32, (seed >> 32) & MASK32)
    word = ((r >> 3) & 1) * 2 + ((c >> 5) & 1)
    chosen = np.choose(word, words)
    byte = (chosen >> ((c >> 3) & 3).astype(np.uint64) * np.uint64(8)) & np.uint64(0xFF)
    return torch.from_numpy(byte >= dropout.keep_threshold(p))


def row_pairs_reference(seed: int, rows: int, cols: int, p: float, stream: int, site: int) -> torch.Tensor:
    """The row-major layout: counter (r & ~1, c & ~7, stream, site), byte (r & 1) * 8 + (c & 7)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    words = philox_reference(r & ~1, c & ~7, np.full_like(r, stream), np.full_like(r, site),
                             seed & MASK32, (seed >> 32) & MASK32)
    chosen = np.choose((r & 1) * 2 + ((c >> 2) & 1), words)
    byte = (chosen >> (c & 3).astype(np.uint64) * np.uint64(8)) & np.uint64(0xFF)
    return torch.from_numpy(byte >= dropout.keep_threshold(p))


# The statistical tests draw their masks in tiles of 64 x 128, one of the shapes
# test_tile_shape_never_changes_the_mask checks against the default 16 x 64: the same masks, computed
# by 8 times fewer interpreted programs (0.5 s instead of 3.4 s for 128 x 1024).
STATS_BLOCK = (64, 128)


def stats_mask(seed: int, rows: int, cols: int, p: float, **kwargs) -> torch.Tensor:
    return dropout.keep_mask(seed_of(seed), rows, cols, p, block=STATS_BLOCK, **kwargs)


def seed_of(value: int) -> torch.Tensor:
    return torch.tensor([value - 2**64 if value >= 2**63 else value], dtype=torch.int64)


@pytest.mark.parametrize("seed,p,stream,site", [(0x1234_5678_9ABC_DEF0, 0.1, 0, 0),
                                                (7, 0.5, 3, 11), (2**64 - 1, 0.93, 65535, 2**32 - 1)])
def test_mask_is_the_documented_function_of_seed_row_col_stream_site(seed, p, stream, site):
    got = dropout.keep_mask(seed_of(seed), 40, 150, p, stream=stream, site=site)
    assert torch.equal(got, mask_reference(seed, 40, 150, p, stream, site))


@pytest.mark.parametrize("seed,p,stream,site", [(0x0123_4567_89AB_CDEF, 0.1, 0, 0), (9, 0.45, 7, 3)])
def test_row_pair_mask_is_its_documented_function(seed, p, stream, site):
    got = dropout.keep_mask(seed_of(seed), 37, 300, p, stream=stream, site=site, row_pairs=True)
    assert torch.equal(got, row_pairs_reference(seed, 37, 300, p, stream, site))


@pytest.mark.parametrize("row_pairs", [False, True])
@pytest.mark.parametrize("block", [(16, 16), (32, 64), (64, 128), (2, 8)])
def test_tile_shape_never_changes_the_mask(block, row_pairs):
    # Kernels draw with their own tile sizes (128 x 64 forward and backward on the GPU, 16 x 16
    # under the interpreter; row kernels take rows in pairs of tiles): the mask must not depend on
    # them.
    seed = seed_of(99)
    assert torch.equal(dropout.keep_mask(seed, 34, 150, 0.2, block=block, row_pairs=row_pairs),
                       dropout.keep_mask(seed, 34, 150, 0.2, block=(16, 64), row_pairs=row_pairs))


@triton.jit
def _compare_kernel(Out, threshold):
    # Every byte value in every byte position, against one threshold.
    values = tl.arange(0, 256)
    shift = (tl.arange(0, 4) * 8)[None, :]
    w = (values[:, None] << shift).to(tl.uint32)  # [256, 4]: byte b holds the value
    t_low, t_top_clear = dropout.threshold_words(threshold)
    flags = dropout._bytes_at_least(w, t_low, t_top_clear)
    bit = (flags >> (shift + 7).to(tl.uint32)) & 1
    tl.store(Out + values[:, None] * 4 + tl.arange(0, 4)[None, :], bit.to(tl.int8))


def test_byte_compare_is_exact_for_every_byte_and_threshold():
    values = torch.arange(256)
    for t in range(256):
        out = torch.empty(256, 4, dtype=torch.int8)
        _compare_kernel[(1,)](out, t)
        expected = (values >= t)[:, None].expand(256, 4)
        assert torch.equal(out.bool(), expected), t


def _run_ptx(text: str, operands: dict) -> int:
    """A model of the PTX the apply asm uses (prmt.b32 in its default mode, and.b32) on 32-bit
    words: operands maps "$i" to values; returns $0."""
    regs = dict(operands)
    body = text.strip().strip("{}")
    for statement in filter(None, (part.strip() for part in body.split(";"))):
        op, args = statement.split(None, 1)
        if op == ".reg":
            continue
        dst, *src = [a.strip() for a in args.split(",")]
        vals = [int(a, 16) if a.startswith("0x") else regs[a] for a in src]
        if op == "and.b32":
            regs[dst] = vals[0] & vals[1]
        elif op == "prmt.b32":
            pool = (vals[0] | vals[1] << 32).to_bytes(8, "little")
            out = 0
            for i in range(4):
                nibble = (vals[2] >> 4 * i) & 0xF
                byte = pool[nibble & 7]
                if nibble & 8:  # sign replicate
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << 8 * i
            regs[dst] = out
        else:
            raise AssertionError(f"unmodelled PTX op {op}")
    return regs["$0"]


def _selector(fn, byte: int) -> int:
    return fn.fn(byte) & MASK32  # the jit function's body is plain integer arithmetic


def test_apply_asm_keeps_exactly_the_decided_elements():
    # The inline PTX is what the GPU runs (the interpreter takes tl.where), so model it here: every
    # byte position and every decision of both elements of a 16-bit pair, and of a 32-bit element.
    rng = np.random.default_rng(0)
    for trial in range(64):
        flags = [int(w) for w in rng.integers(0, 2**32, 2)]
        halves = [int(h) for h in rng.integers(1, 2**16, 2)]
        x32 = int(rng.integers(1, 2**32))
        for b0 in range(4):
            kept0 = [(flags[0] >> (8 * b0 + 7)) & 1, (flags[1] >> (8 * b0 + 7)) & 1]
            sel = _selector(dropout.selector_32, b0)
            got = _run_ptx(dropout.APPLY_32_PTX.value, {"$1": x32, "$2": flags[0], "$3": sel})
            assert got == (x32 if kept0[0] else 0), (trial, b0)
            for b1 in range(4):
                kept1 = (flags[1] >> (8 * b1 + 7)) & 1
                packed = halves[0] | halves[1] << 16
                got = _run_ptx(dropout.APPLY_16_PTX.value,
                               {"$1": packed, "$2": flags[0], "$3": flags[1],
                                "$4": _selector(dropout.selector_16, b0),
                                "$5": _selector(dropout.selector_16, b1)})
                expected = (halves[0] if kept0[0] else 0) | (halves[1] << 16 if kept1 else 0)
                assert got == expected, (trial, b0, b1)


def test_threshold_rounding_and_scale():
    assert dropout.keep_threshold(0.0) == 0 and dropout.dropout_scale(0.0) == 1.0
    assert dropout.keep_threshold(0.1) == 26 and dropout.dropout_scale(0.1) == 256 / 230
    assert dropout.keep_threshold(1e-6) == 1  # never silently off
    assert dropout.keep_threshold(0.9999) == 255
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            dropout.keep_threshold(bad)


def z_scores(kept: torch.Tensor, p_keep: float) -> torch.Tensor:
    """Standard scores of the kept counts along the last dimension."""
    n = kept.shape[-1]
    return (kept.double().sum(-1) - n * p_keep) / math.sqrt(n * p_keep * (1 - p_keep))


@pytest.mark.parametrize("row_pairs", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_overall_and_per_row(p, row_pairs):
    # 128 rows of 1024: a true Bernoulli source exceeds 5 sigma overall with probability 6e-7 and
    # in any of the 128 rows or 1024 columns with probability 7e-5 or 6e-4.
    p_keep = 1 - dropout.keep_threshold(p) / 256
    kept = stats_mask(2026, 128, 1024, p, row_pairs=row_pairs)
    assert abs(z_scores(kept.flatten(), p_keep).item()) < 5
    rows = z_scores(kept, p_keep)
    assert rows.abs().max() < 5, rows.abs().max()
    columns = z_scores(kept.T, p_keep)
    assert columns.abs().max() < 5, columns.abs().max()


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std(correction=0) * b.std(correction=0)))


@pytest.mark.parametrize("row_pairs", [False, True])
def test_no_correlation_between_rows_columns_streams_sites_and_seeds(row_pairs):
    # Pearson's r of two independent 0/1 samples of n pairs is ~ N(0, 1/n) (n r^2 is the 2 x 2
    # chi-square statistic): |r| < 5 / sqrt(n) fails with probability 6e-7 per pair tested.
    # Lags 1..16 along rows and columns cover elements sharing one Philox call (bytes of a word;
    # rows r and r + 8, or r and r + 1 in row pairs) and neighbouring calls.
    rows, cols, p = 128, 512, 0.5
    base = stats_mask(5, rows, cols, p, row_pairs=row_pairs)
    bound = 5 / math.sqrt(rows * cols / 2)
    for lag in range(1, 17):
        assert abs(correlation(base[:, :-lag], base[:, lag:])) < bound, ("column lag", lag)
        assert abs(correlation(base[:-lag], base[lag:])) < bound, ("row lag", lag)
    n_bound = 5 / math.sqrt(rows * cols)
    others = {
        "next stream (head)": stats_mask(5, rows, cols, p, stream=1, row_pairs=row_pairs),
        "next site (layer)": stats_mask(5, rows, cols, p, site=1, row_pairs=row_pairs),
        "next seed (step)": stats_mask(6, rows, cols, p, row_pairs=row_pairs),
        "the other layout": stats_mask(5, rows, cols, p, row_pairs=not row_pairs),
    }
    for what, other in others.items():
        assert abs(correlation(base, other)) < n_bound, what
        assert not torch.equal(base, other), what


def test_keep_mask_keeps_everything_without_dropout():
    assert dropout.keep_mask(seed_of(1), 9, 70, 0.0).all()
