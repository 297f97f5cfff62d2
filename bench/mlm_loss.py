"""MLM decoder + softmax cross-entropy over BERT's vocabulary: the fused chunked kernel
(kernels/mlm_loss.py) against eager PyTorch (linear + float32 cross_entropy, what ops.mlm_loss's
torch path does), torch.compile of the same, and Liger-Kernel's fused linear cross-entropy.

    python bench/mlm_loss.py                  # GPU: N = 4k..80k, hidden 768/1024, vocab 30522, bf16
    python bench/mlm_loss.py --device cpu     # tiny sizes, the torch reference only

Liger-Kernel is optional (`pip install liger-kernel`; a row says "unavailable" without it).

Note on modes: the fused kernel and Liger compute the gradients inside the forward when the
inputs require grad (FLCE), so their `forward` time holds the three GEMMs and their `backward`
only scales stored gradients; compare `full` (forward + backward) across providers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import Benchmark, Unavailable
from harness import compiled as harness_compiled

VOCAB = 30522


def make_inputs(case: dict, device: torch.device, dtype: torch.dtype) -> dict:
    n, h, v = case["tokens"], case["hidden"], case.get("vocab", VOCAB)
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < 0.01] = -100  # a few ignored rows, as after gathering
    return {
        "hidden": torch.randn(n, h, device=device, dtype=dtype, requires_grad=True),
        "weight": (torch.randn(v, h, device=device) * h**-0.5).to(dtype).requires_grad_(),
        "bias": torch.zeros(v, device=device, dtype=dtype, requires_grad=True),
        "labels": labels,
    }


def eager_loss(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias).float()
    count = (labels != -100).sum().clamp(min=1)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / count


def eager(inputs: dict, case: dict):
    return eager_loss(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["labels"])


compiled = harness_compiled(eager_loss)


def fused(inputs: dict, case: dict):
    if inputs["hidden"].device.type != "cuda":
        raise Unavailable("the Triton kernel needs CUDA (the interpreter is for tests)")
    from bert_fast.kernels.mlm_loss import mlm_loss

    return mlm_loss(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["labels"])[0]


def liger(inputs: dict, case: dict):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as err:
        raise Unavailable(f"liger-kernel is not installed ({err})") from None
    if inputs["hidden"].device.type != "cuda":
        raise Unavailable("liger-kernel needs CUDA")
    return liger_fused_linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["labels"],
                                            bias=inputs["bias"], ignore_index=-100)


def flops(case: dict, mode: str) -> float:
    """Logits GEMM 2NVH forward; grad_hidden and grad_weight GEMMs 4NVH backward (the softmax
    work is negligible beside them). Counted where eager spends them, for every provider."""
    gemm = 2 * case["tokens"] * case.get("vocab", VOCAB) * case["hidden"]
    return {"forward": gemm, "backward": 2 * gemm, "full": 3 * gemm}[mode]


bench = Benchmark(
    name="mlm_loss",
    make_inputs=make_inputs,
    providers={"eager": eager, "triton": fused, "torch.compile": compiled, "liger": liger},
    gpu_cases=[dict(tokens=n, hidden=h) for h in (768, 1024) for n in (4096, 16384, 40960, 81920)],
    cpu_cases=[dict(tokens=64, hidden=32, vocab=1000), dict(tokens=256, hidden=64, vocab=VOCAB)],
    modes=("forward", "backward", "full"),
    flops=flops,
    cpu_providers=("eager",),
    baseline="eager",
    description=__doc__.splitlines()[0],
)

if __name__ == "__main__":
    bench.main()
