"""How the kernel modules with a `torch.library.triton_op` launch: `kernel[grid]` eagerly, or through
`wrap_triton` while the op's body is traced (torch.compile, export, make_fx), so the launch lands
in the graph. One rule for all of them."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton


def traced(t: torch.Tensor) -> bool:
    """Whether a public function's call is being traced (torch.compile, export, or fake tensors
    under make_fx): it then calls its triton_op, else launches eagerly. A plain eager tensor skips
    the subclass check (a few microseconds per call)."""
    return torch.compiler.is_compiling() or (type(t) is not torch.Tensor and is_fake(t))


def launch(kernel, grid, traced: bool):
    """kernel[grid], through wrap_triton when `traced`."""
    return wrap_triton(kernel)[grid] if traced else kernel[grid]


def traced_body(like: torch.Tensor) -> bool:
    """Whether a triton_op's body is being traced, from a tensor it holds: a fake or functional
    tensor then, a plain one when the op runs eagerly (opcheck, or an op always called as one). An
    eager body launches directly: the same launch, without wrap_triton's wrapping, which torch 2.11
    also refuses for the interpreter's kernels (TRITON_INTERPRET=1)."""
    return type(like) is not torch.Tensor
