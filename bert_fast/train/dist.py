"""The run's collective helpers in one place: rank, world size, barrier, and decisions made on
rank 0 (or gathered from every rank) that every rank learns. No-ops in a world of one, and before
the process group starts (tools and tests call the checkpoint code without one)."""

from __future__ import annotations

import torch


def _group():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


def rank() -> int:
    return _group().get_rank() if _group() else 0


def world() -> int:
    return _group().get_world_size() if _group() else 1


def barrier() -> None:
    if _group():
        _group().barrier()


def from_rank0(obj):
    """Rank 0's `obj` on every rank (a pickled broadcast)."""
    if not _group():
        return obj
    box = [obj]
    _group().broadcast_object_list(box, src=0)
    return box[0]


def all_ranks(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _group():
        return [obj]
    gathered = [None] * world()
    _group().all_gather_object(gathered, obj)
    return gathered


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on some rank: one all-reduce (MAX) on `device`; the same answer everywhere."""
    if not _group() or world() == 1:
        return list(flags)
    values = torch.tensor([float(f) for f in flags], device=device)
    _group().all_reduce(values, op=_group().ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]
