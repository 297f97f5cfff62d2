"""Argument checks of every public function, the kernels' and the ops' (bert_fast.ops) and the model's
batch checks above them: bad input raises a `TypeError` or `ValueError` naming the argument before
anything reaches a kernel. Here, in the lowest layer, so kernels import nothing above them."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Index dtypes torch.nn.functional.embedding accepts.
INT_DTYPES = (torch.int64, torch.int32)


def check_tensor(name: str, value, *, ndim: int | None = None, dtypes=None, device=None,
                 shape: tuple | None = None) -> torch.Tensor:
    """Check type, rank, dtype, device and shape; `shape` entries of None match any size."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {value.dtype}")
    if device is not None and value.device != torch.device(device):
        raise ValueError(f"{name} is on {value.device}, expected {device}")
    if shape is not None:
        if len(shape) != value.dim() or any(s is not None and s != v for s, v in zip(shape, value.shape)):
            want = ", ".join("*" if s is None else str(s) for s in shape)
            want = f"({want},)" if len(shape) == 1 else f"({want})"
            raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    return value


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], what: str) -> None:
    """All tensors share `what` ('dtype' or 'device') with the first one."""
    first = getattr(tensors[0], what)
    for name, tensor in zip(names[1:], tensors[1:]):
        if getattr(tensor, what) != first:
            raise (TypeError if what == "dtype" else ValueError)(
                f"{name} has {what} {getattr(tensor, what)} but {names[0]} has {first}")
