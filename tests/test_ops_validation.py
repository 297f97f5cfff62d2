"""Validation once (DESIGN.md): a call of a `bert_fast.ops` op checks each tensor argument exactly
once, on the torch path (the op's own checks) and on the fast path (the kernel's public function,
under the Triton interpreter), never again in a layer below. Counted by wrapping `check_tensor` in
every module that validates."""

from collections import Counter

import pytest
import torch

from bert_fast import ops
from bert_fast.kernels import attention, checks, embeddings, layernorm, mlm_loss
from bert_fast.ops import bias_gelu_ext

VALIDATING = (ops, bias_gelu_ext, attention, embeddings, layernorm, mlm_loss)


@pytest.fixture
def checked(monkeypatch):
    """The Counter of argument names check_tensor saw during the test."""
    seen = Counter()

    def counting(name, value, **kwargs):
        seen[name] += 1
        return checks.check_tensor(name, value, **kwargs)

    for module in VALIDATING:
        if hasattr(module, "check_tensor"):
            monkeypatch.setattr(module, "check_tensor", counting)
    return seen


def _calls():
    g = torch.Generator().manual_seed(0)
    x, residual = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    q, k, v = (torch.randn(2, 5, 2, 16, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids = torch.randint(0, 50, (2, 5), generator=g)
    table, positions, types = (torch.randn(n, 32, generator=g) for n in (50, 8, 2))
    labels = torch.tensor([3, -100, 7, 1, -100, 0])
    decoder = torch.randn(50, 32, generator=g)
    return {
        "add_layer_norm": (lambda backend: ops.add_layer_norm(x, w, b, 1e-5, x_bias=b, residual=residual,
                                                              backend=backend),
                           {"x", "weight", "bias", "x_bias", "residual"}),
        "attention": (lambda backend: ops.attention(q, k, v, mask, backend=backend),
                      {"q", "k", "v", "attention_mask"}),
        "embeddings": (lambda backend: ops.embeddings(ids, torch.zeros_like(ids), torch.arange(5).expand(2, 5),
                                                      table, positions, types, w, b, 1e-5, backend=backend),
                       {"input_ids", "token_type_ids", "position_ids", "word", "position", "token_type"}),
        "mlm_loss": (lambda backend: ops.mlm_loss(x, decoder, torch.zeros(50), labels, backend=backend),
                     {"hidden", "weight", "bias", "labels"}),
    }


@pytest.mark.parametrize("backend", ["torch", "fast"])
@pytest.mark.parametrize("op", ["add_layer_norm", "attention", "embeddings", "mlm_loss"])
def test_each_tensor_is_checked_exactly_once(op, backend, checked):
    call, arguments = _calls()[op]
    call(backend)
    assert arguments <= set(checked), f"{op} ({backend}) left {arguments - set(checked)} unchecked"
    twice = {name: n for name, n in checked.items() if n > 1}
    assert twice == {}, f"{op} ({backend}) checked {twice} more than once"


def test_bias_gelu_is_checked_once_on_either_path(checked):
    x, b = torch.randn(4, 8), torch.randn(8)
    for backend in ("torch", "fast"):  # fast: the C++ op on the CPU
        checked.clear()
        ops.bias_gelu(x, b, backend=backend)
        assert checked == Counter({"x": 1, "bias": 1}), backend


def test_a_bad_argument_is_named_on_the_torch_path_too():
    """The torch path (no kernel to validate) names the argument as the kernel would."""
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.add_layer_norm([1.0, 2.0], torch.ones(2), torch.zeros(2), 1e-5, backend="torch")
    with pytest.raises(ValueError, match="bias"):
        ops.bias_gelu(torch.randn(2, 3), torch.randn(4), backend="torch")
