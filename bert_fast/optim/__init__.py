"""Optimizers: fused LAMB and AdamW on the C++/CUDA extension with a readable reference (fused.py),
their PyTorch and Triton fallbacks for a build without CUDA kernels (fallback.py), and the adapter
that keeps LAMB exact under every DeepSpeed ZeRO wrapper (zero.py)."""

from bert_fast.optim.fused import FusedAdamW, FusedLAMB, LAMBReference, adamw_reference, param_groups

__all__ = ["FusedAdamW", "FusedLAMB", "LAMBReference", "adamw_reference", "param_groups"]
