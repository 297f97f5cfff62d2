"""One optimizer step over BERT parameter sets: our fused LAMB / AdamW (csrc/optim*) against the
per-tensor reference loop, torch.optim.AdamW (foreach and fused), DeepSpeed's FusedLamb /
FusedAdam where its CUDA ops build, and our fallbacks, the same optimizers as where bert_fast._C
has no kernels for the device: `fallback` steps LAMB through bert_fast.optim.fallback's
torch._foreach_* ops (what other devices run), `fallback_triton` through the Triton kernels of
bert_fast.kernels.lamb (what a CUDA device runs; GPU only; AdamW steps as in `fallback`).

    python bench/optim.py                      # GPU: BERT-base and -large parameter sets
    python bench/optim.py --device cpu         # BERT-tiny and -mini parameter sets
    python bench/optim.py --compile-report     # sm_90 builds of the Triton LAMB, no GPU:
                                               # writes bench/results/aot/optim.json

Cases: `model` (the parameter set: every tensor of BertForPreTraining at that preset, split into
decay / no-decay groups by bert_fast.optim.param_groups) x `opt` (lamb or adamw). Parameters,
grads and moments are float32 (the master weights DeepSpeed hands the optimizer; --dtype is not
used). The baseline `reference` is the per-tensor loop: LAMBReference for LAMB,
torch.optim.AdamW(foreach=False) for AdamW. Only mode `forward` (= one step) exists.

GB/s counts the minimum any Adam-style step must move, 28 bytes per parameter: read w, g, m, v
and write w, m, v in float32. LAMB needs more (a grad-norm pass and a second pass for the trust
ratio), so its share of the copy bandwidth shows how far it is from that floor. Targets (issue 4):
CPU >= 3x the reference loop; H100 within 1.1x of a bandwidth pass over params + grads + moments.
Issue 21: on a GPU the fallback's step time within 1.3x of `ours`: compare `fallback_triton` (what
FusedLAMB runs on CUDA without the kernels) and `ours`; `fallback` (foreach) moves about 130 bytes
per LAMB parameter against their 40.
"""

from __future__ import annotations

import warnings

import torch
from harness import Benchmark, Unavailable

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.kernels import lamb_aot
from bert_fast.ops import extension
from bert_fast.optim import FusedAdamW, FusedLAMB, LAMBReference, param_groups
from bert_fast.optim import fallback as optim_fallback

HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6)


def make_inputs(case: dict, device: torch.device, dtype: torch.dtype) -> dict:
    with torch.device("meta"):
        model = BertForPreTraining(BertConfig.from_preset(case["model"]))
    groups = []
    for group in param_groups(model, 0.01):
        params = []
        for p in group["params"]:
            q = torch.randn(p.shape, device=device) * 0.02
            q.grad = torch.randn(p.shape, device=device) * 1e-3  # not a leaf the harness resets
            params.append(q)
        groups.append({**group, "params": params})
    return {"groups": groups, "optimizers": {}}


def _stepper(name, make):
    def provider(inputs: dict, case: dict):
        opts = inputs["optimizers"]
        if name not in opts:
            opts[name] = make(inputs["groups"], case, inputs["groups"][0]["params"][0].device)
            opts[name].step()  # state allocation is not part of a step
        opts[name].step()
        return inputs["groups"][0]["params"][0]
    return provider


def _reference(groups, case, device):
    if case["opt"] == "lamb":
        return LAMBReference(groups, max_grad_norm=1.0, **HP)
    return torch.optim.AdamW(groups, foreach=False, **HP)


def _ours(groups, case, device):
    if case["opt"] == "lamb":
        return FusedLAMB(groups, max_grad_norm=1.0, **HP)
    return FusedAdamW(groups, **HP)


def _fallback(triton: bool):
    """`ours` with the kernels taken away (extension.available says no), as on a GPU machine
    whose build found no CUDA toolkit; LAMB through the Triton kernels or the foreach ops."""
    def make(groups, case, device):
        if triton and not optim_fallback.triton_lamb(device):
            raise Unavailable("the Triton LAMB fallback runs on CUDA devices only")
        opt = _ours(groups, case, device)
        fused_step = opt.step

        def step(closure=None):
            real, real_triton = extension.available, optim_fallback.triton_lamb
            extension.available = lambda device="cpu": False
            optim_fallback.triton_lamb = real_triton if triton else (lambda device: False)
            try:
                with warnings.catch_warnings():
                    # said once per process, not once per timed step
                    warnings.filterwarnings("ignore", ".*PyTorch fallbacks", UserWarning)
                    return fused_step(closure)
            finally:
                extension.available, optim_fallback.triton_lamb = real, real_triton

        opt.step = step
        return opt
    return make


def _torch(kind):
    def make(groups, case, device):
        if case["opt"] != "adamw":
            raise Unavailable("torch has no LAMB")
        return torch.optim.AdamW(groups, **{kind: True}, **HP)
    return make


def _deepspeed(groups, case, device):
    if device.type != "cuda":
        raise Unavailable("DeepSpeed's FusedLamb/FusedAdam are CUDA-only")
    try:
        if case["opt"] == "lamb":
            from deepspeed.ops.lamb import FusedLamb
            return FusedLamb(groups, max_grad_norm=1.0, **HP)
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(groups, adam_w_mode=True, **HP)
    except Exception as err:  # not installed, or its CUDA op does not build here
        raise Unavailable(f"DeepSpeed op unavailable: {type(err).__name__}: {err}"[:200]) from None


def _numel(case: dict) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in BertForPreTraining(BertConfig.from_preset(case["model"])).parameters())


bench = Benchmark(
    name="optim",
    description=__doc__,
    make_inputs=make_inputs,
    providers={"reference": _stepper("reference", _reference), "ours": _stepper("ours", _ours),
               "fallback": _stepper("fallback", _fallback(False)),
               "fallback_triton": _stepper("fallback_triton", _fallback(True)),
               "torch_foreach": _stepper("torch_foreach", _torch("foreach")),
               "torch_fused": _stepper("torch_fused", _torch("fused")),
               "deepspeed": _stepper("deepspeed", _deepspeed)},
    gpu_cases=[dict(model=m, opt=o) for m in ("base", "large") for o in ("lamb", "adamw")],
    cpu_cases=[dict(model=m, opt=o) for m in ("tiny", "mini") for o in ("lamb", "adamw")],
    modes=("forward",),
    bytes=lambda case, mode: 28 * _numel(case),
    cpu_providers=("reference", "ours", "fallback", "torch_foreach", "torch_fused"),
    baseline="reference",
    aot_report=lamb_aot.optim_report,
)

if __name__ == "__main__":
    bench.main()
