"""Triton kernels, importable as `bert_fast.kernels` (setup.py maps this folder).

One kernel per file, each with its launcher, `torch.autograd.Function`, public function and
pure-PyTorch reference. Kernels never import the model; `bert_fast.ops` picks them.
"""
