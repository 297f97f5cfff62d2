"""Deterministic sorted segment sums: `out[ids[t]] = sum of values[t] over tokens t`, the gradient of
an embedding table, without atomics and without a host sync.

Ids are sorted first (torch.sort, stable), so each table row's tokens form one segment. The sorted
positions are cut into blocks of BLOCK_T; a program sums the segments within its block with a
segmented scan over a [BLOCK_T, BLOCK_H] tile gathered through the sort's permutation (all rows at
once, no serial loop), writes a segment wholly inside the block to its output row, and a segment
that crosses the block's start or end as a partial row (Head, Tail). A second kernel lets the block
where a crossing segment starts add its partials in block order and write the row. Every sum has a
fixed order, so results are bitwise reproducible; rows of ids that never occur stay zero, as does
`skip_id` (the padding row). `torch.ops.aten.embedding_dense_backward`, which does the same on CUDA
above 3072 tokens, reads the number of segments back to the host to size its buffers: one sync per
table per step, which a CUDA-graphed step cannot have.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 64  # sorted positions per program


@triton.jit
def _segmented_add(flag_a, value_a, flag_b, value_b):
    """Combine of a segmented inclusive scan: a segment start (flag) restarts the sum."""
    return flag_a | flag_b, tl.where(flag_b, value_b, value_a + value_b)


@triton.jit
def _segment_block_kernel(
    Values,  # [T, H] rows to sum (any float dtype)
    SortedIds,  # [T] int64, sorted
    Perm,  # [T] int64: SortedIds[i] = ids[Perm[i]]
    Out,  # [R, H] output, zeros where no segment writes
    Head,  # [n_blocks, H] float32: partial of the block's first segment when it starts before the block
    Tail,  # [n_blocks, H] float32: partial of the block's last segment when it continues after it
    n_tokens, n_cols, stride_values_row, stride_out_row, skip_id,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < n_cols
    pos = b * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = pos < n_tokens
    last = tl.minimum(b * BLOCK_T + BLOCK_T, n_tokens) - 1
    ids = tl.load(SortedIds + pos, mask=valid, other=-1)
    prev = tl.load(SortedIds + pos - 1, mask=valid & (pos > 0), other=-2)
    following = tl.load(SortedIds + pos + 1, mask=pos < n_tokens - 1, other=-3)
    rows = tl.load(Perm + pos, mask=valid, other=0)
    tile = tl.load(Values + rows[:, None] * stride_values_row + cols[None, :],
                   mask=valid[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    starts = (ids != prev) | (pos == b * BLOCK_T)
    _, sums = tl.associative_scan((starts[:, None] & col_mask[None, :], tile), 0, _segmented_add)
    ends = valid & ((ids != following) | (pos == last))
    first_id = tl.load(SortedIds + b * BLOCK_T)
    starts_before = (b > 0) & (tl.load(SortedIds + b * BLOCK_T - 1, mask=b > 0, other=-2) == first_id)
    last_id = tl.load(SortedIds + last)
    continues_after = (last < n_tokens - 1) & (tl.load(SortedIds + last + 1, mask=last < n_tokens - 1,
                                                        other=-3) == last_id)
    in_first = ids == first_id
    is_head = ends & in_first & starts_before
    is_tail = ends & (pos == last) & continues_after & ~(in_first & starts_before)
    is_whole = ends & ~is_head & ~is_tail & (ids != skip_id)
    mask2 = col_mask[None, :]
    tl.store(Out + ids[:, None] * stride_out_row + cols[None, :], sums.to(Out.dtype.element_ty),
             mask=is_whole[:, None] & mask2)
    tl.store(Head + b * n_cols + cols[None, :] + 0 * pos[:, None], sums, mask=is_head[:, None] & mask2)
    tl.store(Tail + b * n_cols + cols[None, :] + 0 * pos[:, None], sums, mask=is_tail[:, None] & mask2)


@triton.jit
def _segment_join_kernel(
    SortedIds, Out, Head, Tail, n_tokens, n_blocks, n_cols, stride_out_row, skip_id,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, JOIN: tl.constexpr,
):
    """The block where a crossing segment starts adds its Tail and the Heads of the blocks the
    segment covers, in block order, and writes the row."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < n_cols
    last = tl.minimum(b * BLOCK_T + BLOCK_T, n_tokens) - 1
    seg = tl.load(SortedIds + last)
    continues_after = (last < n_tokens - 1) & (tl.load(SortedIds + last + 1, mask=last < n_tokens - 1,
                                                        other=-3) == seg)
    whole_block_inside = (b > 0) & (tl.load(SortedIds + b * BLOCK_T - 1, mask=b > 0, other=-2) == seg)
    if continues_after & ~whole_block_inside:
        total = tl.load(Tail + b * n_cols + cols, mask=col_mask, other=0.0)
        # The following blocks the segment reaches, JOIN at a time (a frequent token's segment
        # spans many blocks): they are a prefix of each chunk, since the ids are sorted.
        nxt = b + 1
        more = nxt < n_blocks
        while more:
            blocks = nxt + tl.arange(0, JOIN)
            inside = (blocks < n_blocks) & (tl.load(SortedIds + blocks * BLOCK_T, mask=blocks < n_blocks,
                                                    other=-4) == seg)
            heads = tl.load(Head + blocks[:, None] * n_cols + cols[None, :], mask=inside[:,
                            None] & col_mask[None, :],
                            other=0.0)
            total += tl.sum(heads, 0)
            nxt += JOIN
            more = (nxt < n_blocks) & (tl.sum(inside.to(tl.int32), 0) == JOIN)
        if seg != skip_id:
            tl.store(Out + seg * stride_out_row + cols, total.to(Out.dtype.element_ty), mask=col_mask)


def segment_sum(values: torch.Tensor, ids: torch.Tensor, num_rows: int, skip_id: int = -1,
                launch=None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[num_rows, H] in `out_dtype` (values' dtype by default): row r = the float32 sum of
    values[t] over ids[t] == r (0 when none, and for skip_id). ids: [T] int, each in [0, num_rows).
    `launch` (kernel, grid) -> launcher, for callers that trace (wrap_triton); plain kernel[grid]
    by default."""
    launch = launch or (lambda kernel, grid: kernel[grid])
    tokens, cols = values.shape
    out = torch.zeros((num_rows, cols), dtype=out_dtype or values.dtype, device=values.device)
    if tokens == 0:
        return out
    sorted_ids, perm = torch.sort(ids.long(), stable=True)
    n_blocks = triton.cdiv(tokens, BLOCK_T)
    head = torch.empty((n_blocks, cols), dtype=torch.float32, device=values.device)
    tail = torch.empty_like(head)
    block_h = min(64, triton.next_power_of_2(cols))  # 64 x 64 tiles: the scan stays in registers
    grid = (n_blocks, triton.cdiv(cols, block_h))
    launch(_segment_block_kernel, grid)(values, sorted_ids, perm, out, head, tail, tokens, cols,
                                        values.stride(0), out.stride(0), skip_id, BLOCK_T=BLOCK_T,
                                        BLOCK_H=block_h)
    launch(_segment_join_kernel, grid)(sorted_ids, out, head, tail, tokens, n_blocks, cols, out.stride(0),
                                       skip_id, BLOCK_T=BLOCK_T, BLOCK_H=block_h, JOIN=32)
    return out
