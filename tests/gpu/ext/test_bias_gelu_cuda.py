"""CUDA bias+GELU (csrc/bias_gelu_kernels.cu) in bf16/fp16/fp32 at BERT FFN shapes against float64, the
op's registration on CUDA, and the encoder's fast path against its torch path."""

import pytest
import torch

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.ops import extension
from bert_fast.ops.bias_gelu_ext import bias_gelu, bias_gelu_reference

pytestmark = pytest.mark.gpu
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _needs_cuda_build():
    if not extension.available("cuda"):
        pytest.fail("bert_fast._C has no CUDA kernels on a CUDA machine: rebuild with BERT_FAST_CUDA=1")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (4097, 3072), (3, 77, 4096), (129, 1000)])
def test_matches_float64(shape, dtype, approximate):
    x = torch.randn(shape, device="cuda").mul(3).to(dtype).requires_grad_()
    bias = torch.randn(shape[-1], device="cuda").to(dtype).requires_grad_()
    grad = torch.randn_like(x)
    y = bias_gelu(x, bias, approximate)
    y.backward(grad)
    x64, b64 = (t.detach().double().requires_grad_() for t in (x, bias))
    y64 = bias_gelu_reference(x64, b64, approximate)
    y64.backward(grad.double())
    xe, be = (t.detach().clone().requires_grad_() for t in (x, bias))
    ye = bias_gelu_reference(xe, be, approximate)
    ye.backward(grad)
    for name, ours, eager, exact in (("y", y, ye, y64), ("dx", x.grad, xe.grad, x64.grad)):
        e_ours = (ours.double() - exact).abs().max().item()
        e_eager = (eager.double() - exact).abs().max().item()
        assert e_ours <= 2 * e_eager + ATOL[dtype], f"{name}: ours {e_ours:.3e} eager {e_eager:.3e}"
    rel = (bias.grad.double() - b64.grad).abs().max() / b64.grad.abs().max()
    assert rel.item() < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


def test_deterministic():
    x = torch.randn(2048, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = []
    for _ in range(2):
        x.grad = bias.grad = None
        y = bias_gelu(x, bias)
        y.sum().backward()
        results.append((y, x.grad.clone(), bias.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_opcheck_on_cuda():
    bias_gelu(torch.randn(2, 3, device="cuda"), torch.randn(3, device="cuda"))
    x = torch.randn(5, 8, device="cuda", requires_grad=True)
    bias = torch.randn(8, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.bert_fast.bias_gelu.default, (x, bias, False))


def test_compiles_with_torch_compile():
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    bias = torch.randn(256, device="cuda", requires_grad=True)
    compiled = torch.compile(lambda a, b: bias_gelu(a, b).square().sum(), fullgraph=True)
    compiled(x, bias).backward()
    torch.testing.assert_close(x.grad, torch.func.grad(
        lambda a: bias_gelu_reference(a, bias.detach()).square().sum())(x.detach()), rtol=1e-5, atol=1e-5)


def test_model_fast_path_matches_torch_path():
    torch.manual_seed(0)
    config = BertConfig.from_preset("mini", backend="torch")
    ref = BertForPreTraining(config).cuda().eval()
    fast = BertForPreTraining(BertConfig.from_preset("mini", backend="fast")).cuda().eval()
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(1000, 30000, (4, 128), device="cuda")
    labels = torch.where(torch.rand(4, 128, device="cuda") < 0.15, ids, -100)
    nsp = torch.randint(0, 2, (4,), device="cuda")
    a = ref(ids, mlm_labels=labels, next_sentence_label=nsp)
    b = fast(ids, mlm_labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-5)
