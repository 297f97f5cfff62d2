"""Loads the compiled extension `bert_fast._C` (built from csrc/ by setup.py).

Importing it registers the `torch.ops.bert_fast.*` operators. A missing build is not an error
here: the torch backend works without it, and asking for the fast backend explains what to do.

Where the extension cannot run on a device (typically a CUDA machine whose build found no CUDA
toolkit, so `bert_fast._C` has CPU kernels only), every op that uses it runs a PyTorch fallback
instead (`use_fallback`): FusedLAMB/FusedAdamW a multi-tensor one (bert_fast.optim.fallback; LAMB
on CUDA as Triton kernels, bert_fast.kernels.lamb), bias_gelu eager PyTorch. One warning per
process says so and how to build the fast kernels. `BERT_FAST_CUDA=1` turns the fallback into an
error (`require`). `available` is the one place that decides whether the kernels are there; tests
replace it to simulate a build without them.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

# How to get the CUDA kernels built, quoted by the warning and the errors.
BUILD_HINT = ("reinstall with `make install` (or `pip install --no-build-isolation -e .`) on the GPU "
              "machine: setup.py builds the CUDA kernels with the CUDA toolkit on the PATH or in "
              "CUDA_HOME, or without one with nvcc from PyPI's NVIDIA packages matching torch's CUDA")

_warned = False
_fallback_seen: set[str] = set()  # device types an eager call chose the fallback for


@functools.cache
def _load():
    try:
        from bert_fast import _C
    except ImportError as err:  # not built (e.g. a source checkout without `make install`)
        return None, str(err)
    return _C, ""


def available(device: torch.device | str = "cpu") -> bool:
    """Whether the extension's kernels can run on `device`."""
    module, _ = _load()
    if module is None:
        return False
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and module.with_cuda())


def insists() -> bool:
    """BERT_FAST_CUDA=1: the user wants the extension's kernels or an error, never a fallback."""
    return os.environ.get("BERT_FAST_CUDA", "") == "1"


def _why(device) -> str:
    module, reason = _load()
    if module is None:
        return f"bert_fast._C is not built ({reason})"
    kind = torch.device(device).type
    return f"bert_fast._C was built without kernels for {kind} (no CUDA toolkit at build time)"


def require(device: torch.device | str = "cpu") -> None:
    """Raises RuntimeError saying why the extension cannot run on `device` and what to do."""
    if available(device):
        return
    insisted = " and BERT_FAST_CUDA=1 refuses the PyTorch fallback" if insists() else ""
    raise RuntimeError(f"{_why(device)}, so it cannot run on {device}{insisted}; {BUILD_HINT}")


def use_fallback(device: torch.device | str) -> bool:
    """Whether the extension's ops must run their PyTorch fallbacks on `device`: True where its
    kernels cannot run there, with one warning per process; under BERT_FAST_CUDA=1 that is a
    RuntimeError instead. Not for traced code (it may warn): see `fallback_chosen`."""
    if available(device):
        return False
    if insists():
        require(device)
    _fallback_seen.add(torch.device(device).type)
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"{_why(device)}: FusedLAMB, FusedAdamW and bias_gelu run PyTorch fallbacks on {device} "
            f"(multi-tensor torch ops, slower than the fused kernels). To build the fast kernels, "
            f"{BUILD_HINT}. Set BERT_FAST_CUDA=1 to make this an error.", stacklevel=2)
    return True


def fallback_chosen(device: torch.device) -> bool:
    """`use_fallback`'s answer for `device`'s type as an earlier eager call gave it, for code being
    traced by torch.compile (which runs the step eagerly first and cannot warn or import)."""
    return device.type in _fallback_seen
