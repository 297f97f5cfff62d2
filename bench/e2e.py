"""One pretraining step (forward, backward, optimizer) of BERT: our model on the fast backend (Triton
kernels + the extension, unpadded) and on the torch backend, against Hugging Face
`transformers.BertForPreTraining` (SDPA attention), with the same optimizer and batch.

    python bench/e2e.py                        # GPU: BERT-large and -base, seq 128 and 512, bf16
    python bench/e2e.py --device cpu           # BERT-tiny and -mini, float32, torch backend vs HF

Batches are full-length sequence pairs (the throughput targets assume them): random token ids,
15% of positions predicted (BERT's max_predictions: 20 at seq 128, 80 at 512), NSP labels. Every
provider trains with dropout 0.1 in bf16 weights (the model is cast, as DeepSpeed's bf16 mode does)
and the same optimizer: our FusedLAMB with float32 master weights and clipping at 1.0 where the
extension is built, otherwise torch's AdamW (the row's `optimizer` says which).

`fast` takes the default attention (`model.attention_impl: auto`, bert_fast.ops.attention_impl);
`fast_triton_attention` the same step with our Triton attention (kernels/attention.py) in it.

Columns: seq/s and tokens/s (real tokens: here every token), TFLOP/s from `step_flops` (model
FLOPs, recomputation not counted) and MFU against the device's measured dense bf16 matmul rate
(bench/harness.py `matmul_tflops`, 8192^3; the trainer's logs use the datasheet peak).
`peak_mb` is the whole step's footprint: weights,
optimizer state and activations. Targets (issue 5, one H100, BERT-large, bf16): fast >= 1.5x HF's
step throughput and MFU >= 50%; on the CPU the default path must not be slower than the torch path
(there `auto` resolves to the torch backend, so the CPU rows compare torch with HF).
"""

from __future__ import annotations

import torch
from harness import Benchmark, Unavailable, matmul_tflops

from bert_fast import BertConfig, BertForPreTraining, extension
from bert_fast.optim import FusedLAMB, param_groups
from bert_fast.train.flops import step_flops

VOCAB = 30522
MAX_PREDICTIONS = {128: 20, 512: 80}


def predictions(seq: int) -> int:
    return MAX_PREDICTIONS.get(seq, max(1, round(0.15 * seq)))


def case_flops(case: dict) -> float:
    """Model FLOPs of one step (bert_fast/train/flops.py, the formula the trainer logs; recompute
    not counted, the MLM head on the predicted rows only: what BERT needs)."""
    config = BertConfig.from_preset(case["model"], vocab_size=VOCAB)
    return step_flops(config, [case["seq"]] * case["batch"], predictions(case["seq"]) * case["batch"])


def make_inputs(case: dict, device: torch.device, dtype: torch.dtype) -> dict:
    b, s = case["batch"], case["seq"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (b, s), generator=g)
    ids[:, 0] = 2  # [CLS]-like first token
    token_type = (torch.arange(s) >= s // 2).long().expand(b, s).contiguous()
    labels = torch.full((b, s), -100)
    for row in range(b):
        where = torch.randperm(s - 1, generator=g)[:predictions(s)] + 1
        labels[row, where] = ids[row, where]
    batch = {"input_ids": ids, "token_type_ids": token_type,
             "attention_mask": torch.ones(b, s, dtype=torch.long), "mlm_labels": labels,
             "next_sentence_label": torch.randint(0, 2, (b,), generator=g)}
    return {**{k: v.to(device) for k, v in batch.items()}, "dtype": dtype, "state": {}}


def make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, 0.01)
    if extension.available(device):
        return FusedLAMB(groups, lr=1e-4, max_grad_norm=1.0)
    return torch.optim.AdamW(groups, lr=1e-4, eps=1e-6)


def optimizer_name(device: torch.device) -> str:
    return "FusedLAMB" if extension.available(device) else "torch AdamW"


def _ours(backend: str, attention_impl: str = "auto"):
    def build(case, inputs):
        device = inputs["input_ids"].device
        if backend == "fast" and device.type != "cuda":
            raise Unavailable("the fast backend's Triton kernels need CUDA (the interpreter is for tests)")
        # `auto` on CUDA is the fast backend, and still runs the Triton kernels (with one warning)
        # where the C++/CUDA extension is not built.
        config = BertConfig.from_preset(case["model"], vocab_size=VOCAB,
                                        backend="auto" if backend == "fast" else backend,
                                        attention_impl=attention_impl)
        model = BertForPreTraining(config).to(device=device, dtype=inputs["dtype"]).train()
        optimizer = make_optimizer(model, device)
        batch = {k: inputs[k] for k in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels",
                                        "next_sentence_label")}
        return model, optimizer, lambda: model(**batch).loss

    return build


def _hf(case, inputs):
    try:
        import transformers
    except ImportError as err:
        raise Unavailable(f"transformers is not installed ({err})") from None
    from bert_fast.hf import config_to_hf

    device = inputs["input_ids"].device
    values = config_to_hf(BertConfig.from_preset(case["model"], vocab_size=VOCAB))
    config = transformers.BertConfig(**values)
    model = transformers.BertForPreTraining._from_config(config, attn_implementation="sdpa")
    model = model.to(device=device, dtype=inputs["dtype"]).train()
    optimizer = make_optimizer(model, device)

    def loss():
        return model(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"],
                     attention_mask=inputs["attention_mask"], labels=inputs["mlm_labels"],
                     next_sentence_label=inputs["next_sentence_label"]).loss

    return model, optimizer, loss


def training_step(build):
    """A provider: builds model + optimizer on its first call (kept in `inputs`, so they are freed
    with the inputs before the next provider), then every call is one step."""

    def provider(inputs: dict, case: dict):
        state = inputs["state"]
        if not state:
            state["model"], state["optimizer"], state["loss"] = build(case, inputs)
        state["optimizer"].zero_grad(set_to_none=True)
        loss = state["loss"]()
        loss.backward()
        state["optimizer"].step()
        return loss.detach()

    return provider


def derive(case: dict, row: dict, device: torch.device) -> dict:
    seconds = row["ms"] * 1e-3
    out = {"seq_s": case["batch"] / seconds, "tokens_s": case["batch"] * case["seq"] / seconds,
           "optimizer": optimizer_name(device)}
    peak = matmul_tflops(str(device)) if device.type == "cuda" else None
    if peak and "tflops" in row:
        out["mfu_pct"] = 100 * row["tflops"] / peak
    return out


bench = Benchmark(
    name="e2e",
    make_inputs=make_inputs,
    providers={"hf": training_step(_hf), "torch": training_step(_ours("torch")),
               "fast": training_step(_ours("fast")),
               "fast_triton_attention": training_step(_ours("fast", "triton"))},
    # The headline (BERT-large, seq 128) first: a run cut short by its time limit keeps it.
    gpu_cases=[dict(model="large", seq=128, batch=128), dict(model="large", seq=512, batch=32),
               dict(model="base", seq=128, batch=256), dict(model="base", seq=512, batch=64)],
    cpu_cases=[dict(model="tiny", seq=128, batch=8), dict(model="mini", seq=128, batch=8)],
    modes=("step",),
    flops=lambda case, mode: case_flops(case),
    cpu_providers=("hf", "torch"),
    baseline="hf",
    derive=derive,
    description=__doc__.splitlines()[0],
)

if __name__ == "__main__":
    bench.main()
