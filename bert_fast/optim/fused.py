"""Fused LAMB and AdamW (csrc/optim*.{cpp,cu}) as `torch.optim.Optimizer`s, and a readable
pure-PyTorch LAMB that they are checked against.

LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
https://arxiv.org/abs/1904.00962) in the variant of NVIDIA apex's `FusedLAMB`
(apex/optimizers/fused_lamb.py, csrc/multi_tensor_lamb.cu), the one NVIDIA's and MLPerf's BERT
recipes use:

1. global gradient norm over every parameter of every group; grads are divided by
   max(1, norm / max_grad_norm) (clipping before the step);
2. per tensor: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
   update = (m / bc1) / (sqrt(v / bc2) + eps) + wd * w   (decoupled decay, `adam_w_mode=True`;
   with `adam_w_mode=False` the decay is L2, g += wd * w, before the moments);
3. trust = ||w|| / ||update|| when both are > 0, else 1; applied only to groups with
   weight_decay != 0 unless `use_nvlamb=True` (apex's rule: bias and LayerNorm groups, which have
   no decay, take plain Adam steps); w -= lr * trust * update.

The fused step is one pass for the grad norm, one for moments and the per-tensor sums of
squares, and one that applies the update (recomputed from the moments instead of stored). AdamW
is torch.optim.AdamW's math (decoupled decay) in a single pass. Parameters may be float32,
float16 or bfloat16; the optimizer keeps float32 master weights and moments for the low-precision
ones and writes the rounded result back. Under DeepSpeed ZeRO 1-3 the optimizer sees flat
partitions; `bert_fast.train.deepspeed_compat.attach` tells it which pieces of which tensors each
holds so the trust ratios stay exact.

Where the extension has no kernels for the parameters' device (a CUDA machine whose build found no
CUDA toolkit), both optimizers step through bert_fast.optim.fallback instead: LAMB on CUDA as
Triton kernels with the CUDA kernels' passes and bytes (bert_fast.kernels.lamb), elsewhere as
multi-tensor torch._foreach_* ops with the same math (ZeRO layouts included), AdamW as torch's
fused AdamW. One
warning per process says so (bert_fast.ops.extension.use_fallback); BERT_FAST_CUDA=1 refuses instead.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bert_fast.ops import extension
from bert_fast.optim import fallback as fallback_ops

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The standard BERT split: weight decay on weight matrices, none on biases and LayerNorm
    parameters (any parameter with fewer than 2 dims, or named `bias` or `*norm*`). Frozen
    parameters are left out and empty groups dropped."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = p.dim() < 2 or leaf == "bias" or "norm" in name.lower()
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class ZeroLayout:
    """Where one flat ZeRO partition's elements come from: `segments` rows are (0, start, len,
    slot) = elements [start, start + len) of the partition belong to original tensor `slot`.
    Norm partial sums are all-reduced over `group`; `grad_norm()` returns the exact global grad
    norm (DeepSpeed's, over all partitions and groups)."""
    segments: torch.Tensor
    num_slots: int
    group: object
    grad_norm: Callable[[], object]


def _register_fake_kernels() -> None:
    """Output shapes of the C++ ops for FakeTensor tracing (torch.compile, torch.export)."""
    if not extension.available("cpu"):
        return

    @torch.library.register_fake("bert_fast::optim_sumsq")
    def _sumsq(tensors):
        return tensors[0].new_empty((len(tensors),), dtype=torch.float32)

    @torch.library.register_fake("bert_fast::lamb_phase1")
    def _phase1(params, grads, exp_avg, exp_avg_sq, segments, num_slots, clip, *hyper):
        return params[0].new_empty((num_slots, 2), dtype=torch.float32)

    @torch.library.register_fake("bert_fast::lamb_phase2")
    def _phase2(*args):
        return None

    @torch.library.register_fake("bert_fast::adamw_step")
    def _adamw(*args):
        return None


_register_fake_kernels()


def _check_hparams(lr, betas, eps, weight_decay, max_grad_norm):
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if not isinstance(max_grad_norm, (int, float)) or max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be a number >= 0 (0 = no clipping), got {max_grad_norm!r}")


def _check_params(params: list[torch.Tensor]):
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if p.dtype not in _FLOAT:
            raise TypeError(f"params[{i}] must be float32, float16 or bfloat16, got {p.dtype}")
        if p.grad is not None and (p.grad.shape != p.shape or p.grad.dtype not in _FLOAT
                                   or p.grad.device != p.device):
            raise ValueError(f"params[{i}].grad must match the parameter's shape and device and be a "
                             f"float type; got {tuple(p.grad.shape)} {p.grad.dtype} on {p.grad.device}")
        if p.grad is not None and p.grad.is_sparse:
            raise TypeError(f"params[{i}].grad is sparse; the fused optimizers need dense gradients")


class _Fused(torch.optim.Optimizer):
    """State, master weights, clipping and ZeRO bookkeeping shared by FusedLAMB and FusedAdamW."""

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._zero: dict[int, ZeroLayout] = {}
        self._segments: dict[tuple, torch.Tensor] = {}

    def add_param_group(self, param_group):
        param_group.setdefault("step", 0)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                       group["max_grad_norm"])
        _check_params(group["params"])
        if not hasattr(self, "_own"):
            self._own: set[int] = set()
        self._own.update(id(p) for p in self.param_groups[-1]["params"])

    def adopt(self, params) -> None:
        """Declares `params` whole tensors that stand in for the ones the optimizer was built with
        (DeepSpeed's fp32 copies of them), stepped as they are."""
        self._own.update(id(p) for p in params)

    def set_zero_layout(self, param: torch.Tensor, layout: ZeroLayout | None) -> None:
        """Declares `param` a flat ZeRO partition laid out as `layout` (bert_fast.optim.zero)."""
        if layout is None:
            self._zero.pop(id(param), None)
        else:
            self._zero[id(param)] = layout
            self._own.add(id(param))

    def _live(self, group) -> list[torch.Tensor]:
        params = [p for p in group["params"] if p.grad is not None]
        _check_params(params)
        for p in params:
            if id(p) not in self._own:
                raise RuntimeError(
                    f"{type(self).__name__}: a parameter group holds tensors it was not built with; "
                    "DeepSpeed ZeRO replaces them with flat partitions, whose per-tensor norms are "
                    "wrong unless the layout is known. Create the engine with "
                    "bert_fast.train.deepspeed_compat.initialize(...) (or call its attach(engine)).")
        return params

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            if p.dtype != torch.float32:
                state["master"] = p.detach().float().contiguous()
        return state

    def _buckets(self, params):
        """Groups tensors that one kernel launch can take: same device, grad dtype, param dtype."""
        buckets = defaultdict(list)
        for p in params:
            buckets[(p.device, p.grad.dtype, p.dtype)].append(p)
        for ps in buckets.values():
            if any(id(p) in self._zero for p in ps) and len(ps) != 1:
                raise RuntimeError("a ZeRO partition must be alone in its parameter group")
        return buckets.values()

    @staticmethod
    def _lists(ps, states):
        masters = [s.get("master", p.detach()) for p, s in zip(ps, states)]
        copies = [p.detach() for p in ps] if ps[0].dtype != torch.float32 else []
        grads = [p.grad.detach().contiguous() for p in ps]
        return (masters, copies, grads, [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states])

    def _clip(self, groups, device, fallback: bool) -> torch.Tensor:
        """max(1, ||g|| / max_grad_norm) over every gradient of every group, as a float32 [1]
        tensor on `device` (no host sync). Under ZeRO, DeepSpeed's global norm is exact."""
        max_norm = self.defaults["max_grad_norm"]
        if max_norm <= 0:
            return torch.ones(1, dtype=torch.float32, device=device)
        params = [p for g in groups for p in g["params"] if p.grad is not None]
        zero = [self._zero[id(p)] for p in params if id(p) in self._zero]
        if zero:
            norm = torch.as_tensor(zero[0].grad_norm(), dtype=torch.float32, device=device).reshape(1)
        else:
            by_dtype = defaultdict(list)
            for p in params:
                by_dtype[p.grad.dtype].append(p.grad.detach().contiguous())
            sumsq = torch.zeros(1, dtype=torch.float32, device=device)
            sumsq_op = fallback_ops.optim_sumsq if fallback else torch.ops.bert_fast.optim_sumsq
            for grads in by_dtype.values():
                sumsq = sumsq + sumsq_op(grads).sum()
            norm = sumsq.sqrt()
        self.grad_norm = norm  # for logging; a device tensor, read only when a log line is written
        return torch.clamp(norm / max_norm, min=1.0)

    def _whole_segments(self, ps) -> torch.Tensor:
        key = tuple(p.numel() for p in ps)
        if key not in self._segments:
            self._segments[key] = torch.tensor([[i, 0, n, i] for i, n in enumerate(key)],
                                               dtype=torch.int64).reshape(-1, 4)
        return self._segments[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [(g, ps) for g in self.param_groups if (ps := self._live(g))]
        clip, fallback = {}, {}  # per device: one global grad-norm clip factor, over every live group
        for group, params in live:
            group["step"] += 1
            for ps in self._buckets(params):
                device = ps[0].device
                if device not in clip:
                    fallback[device] = extension.use_fallback(device)
                    clip[device] = self._clip([g for g, _ in live], device, fallback[device])
                tensors = self._lists(ps, [self._state(p) for p in ps])
                self._update(group, ps, tensors, clip[device], fallback[device])
        return loss

    def _update(self, group, ps, tensors, clip, fallback: bool) -> None:
        """One fused update of the bucket `ps` (masters, copies, grads, exp_avg, exp_avg_sq),
        through bert_fast.optim.fallback when `fallback`."""
        raise NotImplementedError

    def load_state_dict(self, state_dict):
        # torch casts loaded floating state to each parameter's dtype; the fused optimizers keep
        # float32 master weights and moments even for bf16/fp16 parameters, so restore those.
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                self.state[p] = {k: (v.to(device=p.device, dtype=torch.float32, copy=True)
                                     if torch.is_tensor(v) and v.is_floating_point() else v)
                                 for k, v in saved[i].items()}


class FusedLAMB(_Fused):
    """LAMB as apex's FusedLAMB (see the module docstring), fused in csrc/.

    Args: lr, betas, eps, weight_decay (per group; 0 turns off the trust ratio for that group
    unless use_nvlamb), max_grad_norm (global clipping before the step; 0 = off), bias_correction,
    adam_w_mode (decoupled decay; False = L2), use_nvlamb (trust ratio on every group).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 max_grad_norm=1.0, bias_correction=True, adam_w_mode=True, use_nvlamb=False):
        _check_hparams(lr, betas, eps, weight_decay, max_grad_norm)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm, bias_correction=bool(bias_correction),
                        adam_w_mode=bool(adam_w_mode), use_nvlamb=bool(use_nvlamb))
        super().__init__(params, defaults)

    def _update(self, group, ps, tensors, clip, fallback):
        masters, copies, grads, ms, vs = tensors
        b1, b2 = group["betas"]
        step = group["step"]
        bc1, bc2 = ((1.0 - b1 ** step, 1.0 - b2 ** step) if group["bias_correction"] else (1.0, 1.0))
        hp = (b1, b2, group["eps"], group["weight_decay"], bc1, bc2, group["adam_w_mode"])
        adaptive = group["use_nvlamb"] or group["weight_decay"] != 0
        layout = self._zero.get(id(ps[0]))
        if layout is None:
            segments, slots = self._whole_segments(ps), len(ps)
        else:
            segments, slots = layout.segments, layout.num_slots
        # The fused ops, or where the extension has no kernels for the device: on CUDA the Triton
        # kernels with the same contract, elsewhere the foreach fallback (which hands phase 2 the
        # updates it kept instead of recomputing them).
        ops = torch.ops.bert_fast
        foreach = False
        if fallback:
            if fallback_ops.triton_lamb(ps[0].device):
                from bert_fast.kernels import lamb as ops
            else:
                foreach = True
        if foreach:
            norms, updates = fallback_ops.lamb_phase1(masters, grads, ms, vs, segments, slots, clip, *hp)
        else:
            norms = ops.lamb_phase1(masters, grads, ms, vs, segments, slots, clip, *hp)
        if layout is not None:
            torch.distributed.all_reduce(norms, group=layout.group)
        step_sizes = lamb_step_sizes(norms, group["lr"], adaptive)
        if foreach:
            fallback_ops.lamb_phase2(masters, copies, updates, segments, step_sizes,
                                     lr=None if adaptive else group["lr"])
        else:
            ops.lamb_phase2(masters, copies, ms, vs, segments, step_sizes, *hp)


def lamb_step_sizes(norms: torch.Tensor, lr: float, adaptive: bool) -> torch.Tensor:
    """lr * trust per slot from [slots, 2] sums of squares of (w, update)."""
    if not adaptive:
        return torch.full((norms.shape[0],), float(lr), dtype=torch.float32, device=norms.device)
    w_norm, u_norm = norms[:, 0].sqrt(), norms[:, 1].sqrt()
    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
    return (lr * trust).to(torch.float32).contiguous()


class FusedAdamW(_Fused):
    """torch.optim.AdamW (decoupled weight decay, bias correction) in one fused pass, with
    optional global grad-norm clipping before the step (max_grad_norm; 0 = off, the default)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 max_grad_norm=0.0):
        _check_hparams(lr, betas, eps, weight_decay, max_grad_norm)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def _live(self, group):
        # Elementwise: flat ZeRO partitions are fine without a layout unless clipping needs the
        # global norm.
        if self.defaults["max_grad_norm"] > 0:
            return super()._live(group)
        params = [p for p in group["params"] if p.grad is not None]
        _check_params(params)
        return params

    def _update(self, group, ps, tensors, clip, fallback):
        masters, copies, grads, ms, vs = tensors
        b1, b2 = group["betas"]
        step = group["step"]
        if fallback:
            fallback_ops.adamw_step(masters, copies, grads, ms, vs, clip, group["lr"], b1, b2, group["eps"],
                                    group["weight_decay"], step, clipping=self.defaults["max_grad_norm"] > 0)
            return
        torch.ops.bert_fast.adamw_step(masters, copies, grads, ms, vs, clip, group["lr"], b1, b2,
                                       group["eps"], group["weight_decay"], 1.0 - b1 ** step,
                                       1.0 - b2 ** step)


class LAMBReference(torch.optim.Optimizer):
    """The oracle: the same LAMB as FusedLAMB, written as a plain per-tensor loop of PyTorch ops
    in the parameters' own dtype (give it float64 copies for a float64 reference)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 max_grad_norm=1.0, bias_correction=True, adam_w_mode=True, use_nvlamb=False):
        _check_hparams(lr, betas, eps, weight_decay, max_grad_norm)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm, bias_correction=bias_correction,
                                      adam_w_mode=adam_w_mode, use_nvlamb=use_nvlamb))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return loss
        # 1. Global grad norm over all groups; clip by dividing.
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).to(grads[0].dtype)
        max_norm = self.defaults["max_grad_norm"]
        clip = torch.clamp(norm / max_norm, min=1.0) if max_norm > 0 else torch.ones_like(norm)
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            b1, b2 = group["betas"]
            wd, step = group["weight_decay"], group["step"]
            bc1, bc2 = (1 - b1 ** step, 1 - b2 ** step) if group["bias_correction"] else (1.0, 1.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                g = p.grad / clip
                if not group["adam_w_mode"]:
                    g = g + wd * p
                # 2. Moments and the Adam direction (+ decoupled decay).
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = (m / bc1) / ((v / bc2).sqrt() + group["eps"])
                if group["adam_w_mode"]:
                    update = update + wd * p
                # 3. Layer-wise trust ratio.
                trust = 1.0
                if group["use_nvlamb"] or wd != 0:
                    w_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(group["lr"] * trust * update)
        return loss


def adamw_reference(params, grads, exp_avgs, exp_avg_sqs, *, step: int, lr: float, betas, eps: float,
                    weight_decay: float) -> None:
    """One AdamW step, in place, as a per-tensor loop (torch.optim.AdamW's math)."""
    b1, b2 = betas
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.addcdiv_(m, v.sqrt() / math.sqrt(bc2) + eps, value=-lr / bc1)
