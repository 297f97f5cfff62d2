"""Loading a training checkpoint: into a DeepSpeed engine (collective; a resume with the optimizer
and RNG, or the weights alone), or as a full fp32 state dict (ZeRO partitions consolidated).

The folder is validated first (bert_fast/train/checkpoint_manifest.py), on rank 0, which broadcasts
the outcome so every rank raises the same CheckpointError. A weights-only load works across world
sizes and ZeRO stages and sets the fp32 master weights from the saved fp32 values
(bert_fast/train/deepspeed_compat/checkpoints.py); a full load needs the world size (partitioned
optimizer state) and ZeRO stage (1 and 2 interchange) it was saved with.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from bert_fast.ops import fp8
from bert_fast.train import dist
from bert_fast.train.checkpoint_manifest import CheckpointError, rng_file, validate
from bert_fast.train.deepspeed_compat import checkpoints as ds_checkpoints
from bert_fast.train.partitions import zero_padding
from bert_fast.train.rng import set_rng_state


def load(engine, path: str | Path, load_optimizer: bool = True, validated: dict | None = None) -> dict:
    """Collective. Loads the checkpoint into `engine` and restores this rank's RNG states;
    returns client_state. load_optimizer=False takes the weights only (any world size, any ZeRO
    stage) and leaves optimizer, lr scheduler and RNG as they are. validated: the metadata
    `validate(path)` returned on rank 0 of this run moments ago (the loop's preflight did), so
    the files are not hashed a second time; None: rank 0 validates them here."""
    path = Path(path)
    error, meta = None, validated
    if dist.rank() == 0 and validated is None:
        try:
            meta = validate(path)
        except CheckpointError as err:
            error = str(err)
    error, meta = dist.from_rank0((error, meta))
    if error is not None:
        raise CheckpointError(error)
    world, stage = dist.world(), int(engine.zero_optimization_stage())
    saved_world, saved_stage = meta["world_size"], meta["zero_stage"]
    if not load_optimizer:
        _load_weights(engine, model_state_dict(path, validated=meta))
        zero_padding(engine)
        return meta["client_state"]
    if saved_world != world and ds_checkpoints.optimizer_partitioned(meta["files"]):
        raise CheckpointError(
            f"{path}: saved by {saved_world} ranks, this run has {world}; its optimizer state is "
            "partitioned per rank and DeepSpeed cannot re-partition it (resume with the same world "
            "size, or load the weights only with load_optimizer=False)")
    if saved_stage != stage and not {saved_stage, stage} <= {1, 2}:
        raise CheckpointError(f"{path}: saved with ZeRO stage {saved_stage}, this run uses stage "
                              f"{stage}; DeepSpeed cannot convert the optimizer state between them")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load it")
    zero_padding(engine)  # a checkpoint saved before padding was zeroed holds stale memory there
    if saved_world == world:
        set_rng_state(torch.load(path / rng_file(dist.rank()), weights_only=True))
    else:
        warnings.warn(f"{path}: saved by {saved_world} ranks, this run has {world}; RNG states not "
                      "restored, so the run continues but not bit-exactly", stacklevel=2)
    return meta["client_state"]


def _load_weights(engine, state: dict[str, torch.Tensor]) -> None:
    """Full fp32 weights into the engine's module and its fp32 master copies (any ZeRO stage)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if dist.rank() == 0:
                _load_module_weights(module, state)
    else:
        _load_module_weights(module, state)
    ds_checkpoints.set_fp32_masters(engine, state)


def model_state_dict(path: str | Path, validated: dict | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint (ZeRO partitions consolidated on CPU): its
    weights, without FP8 scaling state (precision.fp8's buffers: a resume restores those through
    DeepSpeed, init_from and exports start without them).
    validated: what `validate(path)` returned moments ago (not hashed again); None validates."""
    path = Path(path)
    meta = validate(path) if validated is None else validated
    if ds_checkpoints.optimizer_partitioned(meta["files"]):
        state = ds_checkpoints.consolidated_state_dict(path)
    else:
        module, fp32_groups = ds_checkpoints.model_states(path)
        state = _with_fp32_masters(module, fp32_groups, meta.get("param_group_names"))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items() if not fp8.is_state_key(k)}


def _load_module_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict but for FP8 scaling state, which a weights-only load leaves fresh."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not fp8.is_state_key(k)]
    if missing or unexpected:
        raise RuntimeError(f"Error(s) in loading state_dict for {type(module).__name__}: missing keys "
                           f"{missing}, unexpected keys {unexpected}")


def _with_fp32_masters(state: dict, groups, group_names) -> dict:
    """Stage 0 in bf16/fp16: the module state holds the 16-bit copy, and the fp32 masters come as
    `groups` (lists of tensors in param-group order), which the manifest's `param_group_names` maps
    back to names. They replace the rounded copies."""
    if not groups or not group_names:
        return state
    pairs = [(n, t) for names, tensors in zip(group_names, groups) for n, t in zip(names, tensors)]
    if len(group_names) != len(groups) or any(len(a) != len(b) for a, b in zip(group_names, groups)) or any(
            n not in state or tuple(state[n].shape) != tuple(t.shape) for n, t in pairs):
        warnings.warn("the checkpoint's fp32 master groups do not match its parameter names; "
                      "using the 16-bit module weights", stacklevel=3)
        return state
    state.update((n, t.detach().float().clone()) for n, t in pairs)
    return state
