"""Optimizers: fused LAMB and AdamW on the C++/CUDA extension with a readable reference (fused.py),
their PyTorch and Triton fallbacks for a build without CUDA kernels (fallback.py), and the
DeepSpeed-independent half of exact LAMB under ZeRO: its settings and partition layout maths
(zero.py; reading DeepSpeed's wrappers is bert_fast/train/deepspeed_compat)."""

from bert_fast.optim.fused import FusedAdamW, FusedLAMB, LAMBReference, adamw_reference, param_groups

__all__ = ["FusedAdamW", "FusedLAMB", "LAMBReference", "adamw_reference", "param_groups"]
