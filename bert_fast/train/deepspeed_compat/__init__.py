"""Every use of DeepSpeed's internals, in one place, with the DeepSpeed versions it was checked against.

The rest of the package uses DeepSpeed's public API only (`deepspeed.initialize`,
`deepspeed.init_distributed`, `deepspeed.zero.GatheredParameters`, the engine's methods); where
that API has no way to do what an exact optimizer or a bit-exact checkpoint needs, it calls the
functions of this package, each of which says which internals it touches and why:
- here: the supported versions, engine start (`initialize`) and what the loop logs;
- wrappers.py: how DeepSpeed's optimizer wrappers lay out the tensors our optimizer steps;
- checkpoints.py: DeepSpeed's checkpoint files, its checkpoint engine and the fp32 master weights.
tests/test_deepspeed_compat.py walks the package's source and fails if a module outside this
package names one of those internals.

Supported: DeepSpeed `SUPPORTED`, setup.py's requirement (constraints.txt pins a version inside it),
checked at engine start by `initialize`, which refuses any other version by name. Every function was
read against DeepSpeed 0.19.0's and 0.19.8's source, and test_optim_zero.py, test_checkpoint_ranks.py
and test_export.py pass with both; the `getattr` fallbacks are 0.19.0's (0.19.8 added
`round_robin_bit16_offsets` and `sub_group_process_groups`). To support another DeepSpeed: check each
function against its source, run the ZeRO tests (test_optim_zero.py, test_checkpoint_ranks.py,
test_pretrain_deepspeed.py, test_fp8_train.py) with it, then change setup.py and `SUPPORTED` together.

ZeRO-3 needs no internals for the model itself: it gathers a module's parameters around that
module's forward and backward, and bert_fast/model/bert.py reads every parameter inside its own module's
forward.
"""

from __future__ import annotations

import operator
import re

import torch

from bert_fast.optim import zero as zero_lamb
from bert_fast.train.deepspeed_compat.wrappers import attach

SUPPORTED = ">=0.19,<0.20"  # setup.py's `deepspeed` requirement says the same (a test checks)

_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
            "!=": operator.ne}


# ---- version -------------------------------------------------------------------------------

def _release(version: str) -> tuple[int, ...]:
    """(0, 19, 8) for '0.19.8', '0.19.8+cu124', '0.19.8rc1'."""
    match = re.match(r"\d+(\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"not a version number: {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def supports(version: str, specifier: str = SUPPORTED) -> bool:
    """Whether `version` satisfies every clause of `specifier` ('>=0.19,<0.20'), releases compared
    part by part with missing parts as 0."""
    have = _release(version)
    for clause in specifier.split(","):
        match = re.fullmatch(r"\s*(>=|<=|==|!=|>|<)\s*([\d.]+)\s*", clause)
        if match is None:
            raise ValueError(f"cannot read the version clause {clause!r} of {specifier!r}")
        want = _release(match.group(2))
        width = max(len(have), len(want))
        if not _COMPARE[match.group(1)](have + (0,) * (width - len(have)), want + (0,) * (width - len(want))):
            return False
    return True


def check_version(version: str | None = None) -> None:
    """Raises RuntimeError naming the installed and the supported DeepSpeed when they differ."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    if not supports(version):
        raise RuntimeError(f"DeepSpeed {version} is installed, but bert_fast supports deepspeed{SUPPORTED} "
                           f"only (it relies on internals of those versions: {__name__}). Install one: "
                           f"pip install 'deepspeed{SUPPORTED}'")


# ---- engine start ----------------------------------------------------------------------------

def initialize(model, optimizer, config, **kwargs):
    """`deepspeed.initialize` with a FusedLAMB/FusedAdamW client optimizer: checks the DeepSpeed
    version and the config first (nothing starts under a setting that would not be exact), then
    tells the optimizer how DeepSpeed laid out the tensors it steps (`attach`)."""
    try:
        import deepspeed
    except ImportError as err:
        raise RuntimeError(f"DeepSpeed is not installed (pip install 'deepspeed{SUPPORTED}')") from err
    check_version(deepspeed.__version__)
    config = zero_lamb.load_config(config)
    zero_lamb.check_config(config, optimizer)
    # FP16_UnfusedOptimizer (stage 0 with bf16/fp16) steps the client optimizer once with zero
    # grads while it is built, to create its state (0.19.0-0.19.8). For LAMB and AdamW that is a
    # real step (weight decay, trust ratio 1/wd, one more step count); skip it, our state is
    # created at the first real step.
    optimizer.step = lambda closure=None: None
    try:
        result = deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
    finally:
        del optimizer.step
    attach(result[0])
    return result


def use_lr_scheduler(engine, scheduler) -> None:
    """Makes `scheduler` the one the engine steps at accumulation boundaries and checkpoints.
    Ours is built on the client optimizer after DeepSpeed wrapped it (its param groups carry the lr
    under every wrapper); `deepspeed.initialize` takes only a scheduler or a callable that it calls
    before our `attach`. Sets `engine.lr_scheduler` (0.19.0-0.19.8: read by step, save, load)."""
    engine.lr_scheduler = scheduler


# ---- what the loop logs ----------------------------------------------------------------------

def loss_scale(engine) -> float | None:
    """The fp16 dynamic loss scale (None in bf16/fp32): the wrapper's `cur_scale` or `loss_scale`,
    or its `loss_scaler`'s (ZeRO wrappers, 0.19.0-0.19.8; no engine method returns it)."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    for name in ("cur_scale", "loss_scale"):
        value = getattr(opt, name, None)
        if value is None and hasattr(opt, "loss_scaler"):
            value = getattr(opt.loss_scaler, name, None)
        if value is not None:
            return float(value)
    return None


def global_grad_norm(engine) -> float | None:
    """The last step's gradient norm: DeepSpeed's under ZeRO (`engine.get_global_grad_norm()`), else
    the one our optimizer clipped with, found as the wrapper's client `optimizer` where there is one
    (0.19.0-0.19.8: no engine method returns the client optimizer)."""
    value = engine.get_global_grad_norm()
    if value is None:
        client = getattr(engine.optimizer, "optimizer", engine.optimizer)
        value = getattr(client, "grad_norm", None)
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)
