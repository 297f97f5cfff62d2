"""Loads the compiled extension `bert_fast._C` (built from csrc/ by setup.py).

Importing it registers the `torch.ops.bert_fast.*` operators. A missing build is not an error
here: the torch backend works without it, and asking for the fast backend explains what to do.
"""

from __future__ import annotations

import functools

import torch


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


def require(device: torch.device | str = "cpu") -> None:
    module, reason = _load()
    if module is None:
        raise RuntimeError(
            f"bert_fast._C is not built ({reason}); run `make install` or "
            "`pip install --no-build-isolation -e .` in the repository")
    if not available(device):
        raise RuntimeError(
            f"bert_fast._C was built without CUDA kernels, so it cannot run on {device}; rebuild "
            "with a CUDA build of torch and a CUDA toolkit (BERT_FAST_CUDA=1 to insist)")
