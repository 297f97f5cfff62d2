"""Unpadding: pack the real tokens of a padded batch into rows, and put them back.

A `Packing` is built once per batch from the attention mask; the fast path packs `[B, S, ...]`
into `[T, ...]` (T = real tokens, in row-major order of the mask, as flash-attn's `unpad_input`),
runs every layer on the packed rows with `cu_seqlens`, and re-pads only where a caller needs it.
Any mask works, not only prefix masks: a token's row is its rank among the real tokens.

A batch that arrives packed (the training loader's static form: `cu_seqlens` and a fixed row
count T whose rows past `cu_seqlens[-1]` are filler) gets its layout without a host sync:
`packed_layout` places each row at (its sequence, its position) of a padded [B, S] batch, and
`filler_segments` cuts the filler into sequences of its own for attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Packing:
    indices: torch.Tensor  # [T] int64: flat position b * seq + s of each real token
    cu_seqlens: torch.Tensor  # [B + 1] int32: sequence b owns rows cu_seqlens[b]:cu_seqlens[b + 1]
    max_seqlen: int
    batch: int
    seq: int

    @property
    def total(self) -> int:
        return self.indices.shape[0]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [T, ...] (differentiable)."""
        return x.flatten(0, 1).index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, S, ...] with zeros at padding positions (differentiable)."""
        out = x.new_zeros((self.batch * self.seq, *x.shape[1:]))
        return out.index_copy(0, self.indices, x).unflatten(0, (self.batch, self.seq))

    def gather(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows of packed `x` at flat padded `positions` [N]; zeros where a position is padding
        (what `pad(x).flatten(0, 1)[positions]` gives, without materialising the padded tensor)."""
        row_of = torch.full((self.batch * self.seq,), self.total, dtype=torch.int64, device=x.device)
        row_of.index_copy_(0, self.indices, torch.arange(self.total, device=x.device))
        rows = row_of[positions]
        if self.total == 0:
            return x.new_zeros((positions.shape[0], *x.shape[1:]))
        real = (rows < self.total).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(real, x.index_select(0, rows.clamp(max=self.total - 1)), 0)

    def first_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Position 0 of every sequence (what the pooler reads): [B, ...]."""
        return self.gather(x, torch.arange(self.batch, device=x.device) * self.seq)


def unpad(attention_mask: torch.Tensor) -> Packing:
    """The packing of a `[B, S]` mask (nonzero = real token).

    One host sync: T and max_seqlen size the packed tensors and the kernel grid, so both are
    copied to the host together; `nonzero_static` then needs no second sync."""
    batch, seq = attention_mask.shape
    keep = attention_mask.to(torch.bool)
    seqlens = keep.sum(1, dtype=torch.int32)
    cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    total, max_seqlen = torch.stack([cu_seqlens[-1], seqlens.max()]).tolist()
    indices = torch.nonzero_static(keep.flatten(), size=total).squeeze(1)
    return Packing(indices, cu_seqlens, max_seqlen, batch, seq)


def dense(batch: int, seq: int, device: torch.device) -> Packing:
    """The packing of a batch without padding (no mask given): no host sync at all."""
    cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)
    return Packing(torch.arange(batch * seq, device=device), cu_seqlens, seq, batch, seq)


def packed_layout(cu_seqlens: torch.Tensor, total: int, seq: int) -> Packing:
    """The Packing of `total` packed rows whose sequences are `cu_seqlens` [B + 1] (each at most
    `seq` long; rows from cu_seqlens[-1] on are filler): real row t sits at b * seq + p of a
    padded [B, seq] batch, filler rows at B * seq, one past its end. No host sync."""
    rows = torch.arange(total, device=cu_seqlens.device)
    batch = cu_seqlens.shape[0] - 1
    # right=True: of several sequences starting at row t (empty ones), the last, which holds it.
    owner = torch.searchsorted(cu_seqlens, rows.to(cu_seqlens.dtype), right=True) - 1
    owner = owner.clamp(max=batch - 1)
    position = rows - cu_seqlens[owner].long()
    indices = torch.where(rows < cu_seqlens[-1], owner * seq + position, batch * seq)
    return Packing(indices, cu_seqlens, seq, batch, seq)


def to_padded(layout: Packing, x: torch.Tensor) -> torch.Tensor:
    """[T, ...] rows of a `packed_layout` -> [B, seq, ...]: zeros where no row lands, filler
    rows dropped (differentiable)."""
    out = x.new_zeros((layout.batch * layout.seq + 1, *x.shape[1:]))
    return out.index_copy(0, layout.indices, x)[:-1].unflatten(0, (layout.batch, layout.seq))


def from_padded(layout: Packing, y: torch.Tensor) -> torch.Tensor:
    """[B, seq, ...] -> the [T, ...] rows of a `packed_layout`, filler rows zero (differentiable)."""
    rows = torch.cat([y.flatten(0, 1), y.new_zeros((1, *y.shape[2:]))])
    return rows.index_select(0, layout.indices)


def filler_segments(cu_seqlens: torch.Tensor, total: int, seq: int) -> torch.Tensor:
    """cu_seqlens followed by the filler rows [cu_seqlens[-1], total) cut into pieces of at most
    `seq` rows: [B + 1 + ceil(total / seq)], empty pieces where there is less filler. Attention
    then keeps filler to itself (finite values, never read) and no piece exceeds max_seqlen."""
    pieces = -(-total // seq)
    steps = torch.arange(1, pieces + 1, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    ends = cu_seqlens[-1:] + seq * steps
    return torch.cat([cu_seqlens, ends.clamp(max=total)])
