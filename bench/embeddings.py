"""BERT embeddings, `dropout(LayerNorm(word[ids] + token_type[types] + position[pos]))`: the fused
Triton kernel (kernels/embeddings.py) against eager PyTorch (what ops.embeddings' torch path runs)
and torch.compile of it.

    python bench/embeddings.py                 # GPU: batch x seq 32x128 .. 64x512, hidden 768/1024, bf16
    python bench/embeddings.py --device cpu    # tiny sizes, the torch reference only

Training mode with dropout 0.1, vocabulary 30522, 512 positions, 2 token types. The Triton
provider skips the id range check (`check_ids=False`, one host sync that ops.embeddings runs once
per batch) so the figure is the kernels' own.

GB/s counts the traffic of the fused design, the same figure for every provider: forward gathers
one word row per token and writes the output and x-hat (position and token-type rows stay in L2;
the ids add 24 bytes per token); backward reads dy and x-hat, writes dh, then two segment sums (word; position
and type pairs) read dh and write the zero-filled gradient tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import DTYPES, Benchmark, Unavailable
from harness import compiled as harness_compiled

VOCAB, POSITIONS, TYPES = 30522, 512, 2
EPS = 1e-12
DROPOUT = 0.1


def make_inputs(case: dict, device: torch.device, dtype: torch.dtype) -> dict:
    b, s, h = case["batch"], case["seq"], case["hidden"]

    def leaf(*shape, scale=0.02, shift=0.0):
        return (torch.randn(*shape, device=device) * scale + shift).to(dtype).requires_grad_()

    return {
        "input_ids": torch.randint(0, VOCAB, (b, s), device=device),
        "token_type_ids": torch.randint(0, TYPES, (b, s), device=device),
        "position_ids": torch.arange(s, device=device).expand(b, s),
        "word": leaf(VOCAB, h), "position": leaf(POSITIONS, h), "token_type": leaf(TYPES, h),
        "norm_weight": leaf(h, scale=0.1, shift=1.0), "norm_bias": leaf(h, scale=0.1),
    }


def eager_fn(input_ids, token_type_ids, position_ids, word, position, token_type, norm_weight,
             norm_bias):
    h = F.embedding(input_ids, word, 0) + F.embedding(token_type_ids, token_type)
    h = h + F.embedding(position_ids, position)
    h = F.layer_norm(h, (h.shape[-1],), norm_weight, norm_bias, EPS)
    return F.dropout(h, DROPOUT, training=True)


def eager(inputs: dict, case: dict):
    return eager_fn(**inputs)


compiled = harness_compiled(eager_fn)


def fused(inputs: dict, case: dict):
    if inputs["word"].device.type != "cuda":
        raise Unavailable("the Triton kernel needs CUDA (the interpreter is for tests)")
    from bert_fast.kernels.embeddings import embeddings

    return embeddings(**inputs, eps=EPS, padding_idx=0, dropout_p=DROPOUT, check_ids=False)


def _element_size() -> int:
    args = bench.args
    name = args.dtype if args and args.dtype else ("bf16" if args and args.device.startswith("cuda")
                                                   else "fp32")
    return torch.empty((), dtype=DTYPES[name]).element_size()


def bytes_moved(case: dict, mode: str) -> float:
    tokens, hidden, e = case["batch"] * case["seq"], case["hidden"], _element_size()
    forward = 3 * tokens * hidden * e + 3 * tokens * 8  # a word row in; y and x-hat out
    backward = (5 * tokens * hidden + (VOCAB + POSITIONS + TYPES) * hidden) * e + 3 * tokens * 8
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode]


def aot_report() -> list[dict]:
    """The sm_90 builds of this op's kernels (kernels/row_norm_aot.py)."""
    from bert_fast.kernels.row_norm_aot import embeddings_report

    return embeddings_report("bf16")


bench = Benchmark(
    name="embeddings",
    make_inputs=make_inputs,
    providers={"eager": eager, "triton": fused, "torch.compile": compiled},
    gpu_cases=[dict(batch=b, seq=s, hidden=h) for h in (768, 1024)
               for b, s in ((32, 128), (256, 128), (64, 512))],
    cpu_cases=[dict(batch=4, seq=32, hidden=128)],
    modes=("forward", "backward", "full"),
    bytes=bytes_moved,
    cpu_providers=("eager",),
    baseline="eager",
    description=__doc__.splitlines()[0],
    aot_report=aot_report,
)

if __name__ == "__main__":
    bench.main()
