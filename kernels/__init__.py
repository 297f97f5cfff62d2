"""Triton kernels, importable as `bert_fast.kernels` (setup.py maps this folder).

One kernel per file, each with its launcher, `torch.autograd.Function`, public function and
pure-PyTorch reference. Kernels never import the model; `bert_fast.ops` picks them.
"""

import os as _os

if _os.environ.get("TRITON_INTERPRET") == "1":
    # triton 3.6's interpreter turns loop bounds into ints with int() on 1-element arrays, which
    # numpy >= 2.4 refuses, so `range(lo, hi)` over runtime bounds fails under the interpreter.
    # Apply upstream's fix (https://github.com/triton-lang/triton/issues/9171) instead of writing
    # while loops: the compiler software-pipelines only `for` loops. Tests only; compiled code
    # never takes this path.
    from triton.runtime import interpreter as _interpreter

    if hasattr(_interpreter, "_patch_lang_tensor") and not hasattr(
            _interpreter._patch_lang_tensor, "_bert_fast_fix"):
        _patch_lang_tensor = _interpreter._patch_lang_tensor

        def _patch_lang_tensor_index(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        _patch_lang_tensor_index._bert_fast_fix = True
        _interpreter._patch_lang_tensor = _patch_lang_tensor_index
