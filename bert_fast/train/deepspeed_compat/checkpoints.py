"""DeepSpeed's checkpoint files, its checkpoint engine and the fp32 master weights (DeepSpeed internals).

bert_fast/train's checkpoint modules save and load through the engine's public save_checkpoint and
load_checkpoint; what those do not cover is here: which files belong to which rank, the layout of
the model-states file, consolidating ZeRO partitions, hashing files as the checkpoint engine writes
them, and setting the fp32 masters from full weights. Checked against DeepSpeed 0.19.0-0.19.8.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bert_fast.train.deepspeed_compat.wrappers import SubGroup, stage3_sub_groups

MODEL_STATES = "mp_rank_00_model_states.pt"  # stage 0-2: the module, and stage 0's optimizer
_RANK_FILE = re.compile(r"_pp_rank_(\d+)_")


def file_rank(name: str) -> int | None:
    """The rank whose ZeRO partition a file of a DeepSpeed checkpoint holds (`*_pp_rank_<rank>_*`);
    None for the files of no rank (stage 0-2 model states, zero_to_fp32.py). 0.19.0-0.19.8 names."""
    match = _RANK_FILE.search(name)
    return int(match.group(1)) if match else None


def optimizer_partitioned(names) -> bool:
    """Whether a checkpoint's files (names) hold per-rank ZeRO optimizer partitions
    (`zero_pp_rank_*optim_states.pt`, 0.19.0-0.19.8 names), which DeepSpeed cannot re-partition for
    another world size."""
    return any("zero_pp_rank_" in name and name.endswith("optim_states.pt") for name in names)


def model_states(folder: Path) -> tuple[dict, list[list[torch.Tensor]] | None]:
    """A stage 0-2 checkpoint's module state dict (`MODEL_STATES`'s "module") and, at stage 0 in
    bf16/fp16, FP16_UnfusedOptimizer's fp32 master groups (its "optimizer" state's `fp32_groups`, in
    param-group order; None otherwise), on the CPU. The file's layout is DeepSpeed's (0.19.0-0.19.8)."""
    saved = torch.load(folder / MODEL_STATES, map_location="cpu", weights_only=False)
    optimizer = saved.get("optimizer")
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    return dict(saved["module"]), groups or None


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint whose optimizer state is partitioned per rank, put
    together on the CPU by DeepSpeed's own zero_to_fp32 (`deepspeed.utils.zero_to_fp32`, a module of
    its package rather than of its API, 0.19.0-0.19.8; it prints its progress: sent to stderr,
    stdout is for results)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


@contextlib.contextmanager
def checkpoint_writes(engine, save: Callable[[dict, str, bool], None]) -> Iterator[None]:
    """While open, DeepSpeed's default checkpoint engine (TorchCheckpointEngine, which writes each
    file synchronously with torch.save) writes through `save(state_dict, path, zip_format)` instead,
    zip_format being its `zipfile_serialization`. No public hook sees the files as they are written;
    this replaces the engine's `checkpoint_engine.save` (0.19.0-0.19.8) on that instance. Any other
    checkpoint engine (asynchronous, Nebula, ...) is left as it is."""
    ce = getattr(engine, "checkpoint_engine", None)
    try:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    except ImportError:
        TorchCheckpointEngine = None
    if TorchCheckpointEngine is None or type(ce) is not TorchCheckpointEngine or "save" in vars(ce):
        yield
        return
    ce.save = lambda state_dict, path: save(state_dict, path, ce.zipfile_serialization)
    try:
        yield
    finally:
        del ce.save


def param_group_names(engine) -> list[list[str]] | None:
    """Parameter names per optimizer group, in the order DeepSpeed's wrapper keeps its groups
    (`fp16_groups`: the module's parameters, grouped as bert_fast.optim.param_groups made them;
    0.19.0-0.19.8 ZeRO and FP16 wrappers); maps the wrapper's fp32 master groups back to names.
    None without such a wrapper."""
    groups = getattr(engine.optimizer, "fp16_groups", None)
    if not isinstance(groups, list):
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    try:
        return [[names[id(p)] for p in group] for group in groups]
    except (KeyError, TypeError):
        return None


def set_fp32_masters(engine, state: dict[str, torch.Tensor]) -> None:
    """Sets the wrapper's fp32 master weights from the fp32 values themselves, not from the
    (possibly bf16/fp16) module copy, which would round them: FP16_UnfusedOptimizer (stage 0) by its
    `fp32_groups`, ZeRO-3 by its partition layout (DeepSpeed's own set_full_hp_param slices past the
    end of a padded last partition), ZeRO 1/2 and BF16_Optimizer through DeepSpeed's per-parameter
    fragment mapping (`_hp_mapping`, `deepspeed.utils.safe_set_full_fp32_param`); any other wrapper
    refreshes them from the module copy (`refresh_fp32_params`). 0.19.0-0.19.8."""
    optimizer, module = engine.optimizer, engine.module
    names = param_group_names(engine)
    fp32_groups = getattr(optimizer, "fp32_groups", None)
    if names is not None and isinstance(fp32_groups, list) and all(
            isinstance(t, torch.Tensor) for g in fp32_groups for t in g) and [len(g) for g in names] == [
            len(g) for g in fp32_groups]:
        with torch.no_grad():
            for group_names, masters in zip(names, fp32_groups):
                for name, master in zip(group_names, masters):
                    master.copy_(state[name].to(master.device, master.dtype))
        return
    params = list(module.named_parameters())
    subs = stage3_sub_groups(engine)
    if subs:
        _set_stage3_masters(subs, {id(p): n for n, p in params}, state)
        return
    if params and all(hasattr(p, "_hp_mapping") for _, p in params):
        from deepspeed.utils import safe_set_full_fp32_param

        for name, p in params:
            safe_set_full_fp32_param(p, state[name].to(p.device, torch.float32))
        return
    if hasattr(optimizer, "refresh_fp32_params"):
        optimizer.refresh_fp32_params()


def _set_stage3_masters(subs: list[SubGroup], names: dict[int, str], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for sub in subs:
            for piece in sub.pieces:
                if piece.held:
                    full = state[names[id(piece.param)]].reshape(-1)
                    sub.master[piece.offset:piece.offset + piece.held].copy_(
                        full[piece.start:piece.start + piece.held])
