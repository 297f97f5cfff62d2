"""The training loop: DeepSpeed engine steps with gradient accumulation, evaluation, checkpoints,
signals, stability checks and metrics.

Per optimizer step: `accumulation` micro batches (forward, `engine.backward`, `engine.step`, which
applies the optimizer at the accumulation boundary), each a packed static batch checked on the
host by the loader, so the step itself never waits for the device: the loop reads the device only
every `train.check_every` steps and at log, eval and checkpoint steps. There, before the optimizer
runs, it checks that no loss since the last check was NaN/inf (the first bad step is kept on the
device) and whether a rank received a signal: one all-reduce (bert_fast/train/stops.py), so every
rank stops at the same step for the same reason, never one rank raising while the others wait in
a collective. A checkpoint is only written at a checked step, so a diverged run stops with its
checkpoints good (the weights in memory took the steps since the last check). fp16 steps that
overflow are skipped by DeepSpeed's loss scaler, counted and logged; a run whose scale has fallen
to `precision.min_loss_scale` and still overflows is stopped. SIGTERM/SIGINT finish the steps up
to the next check, save a checkpoint and end the run normally. `train.compile` and
`train.cuda_graphs`: bert_fast/train/compiled.py.

Signals: DataLoader workers ignore SIGINT/SIGTERM, so a signal to the whole process group (SLURM's
scancel, Ctrl-C in a terminal) reaches the ranks and the run saves and exits 0. The DeepSpeed
launcher (`deepspeed pretrain.py`), when it is signalled itself, forwards SIGTERM to the ranks but
SIGKILLs them 30 s later and exits 1, which a checkpoint of a large model may not survive: send the
signal to the ranks (or to the whole job step: `scancel --signal=TERM`), not only the launcher.

Before training, the run claims its output folder (bert_fast/train/output.py: one run per folder,
decided on rank 0), and every rank checks (bert_fast/train/preflight.py) that a checkpoint to
resume or initialise from (resolved and hashed on rank 0 only) fits the model, the global batch
and train.steps, and that export.hf_dir can be written at the end; then rank 0 saves the resolved
recipe in the output folder (`config.yaml`). Throughput windows leave out the time of evaluation
and checkpoints; MFU is per GPU (job TFLOP/s / world size / peak).

Faults: rank 0 first removes what a killed run left in the run's folders
(bert_fast/train/leftovers.py); a resumed run puts metrics.jsonl back as it was at its checkpoint
(each record once, in order; the checkpoint's own record rebuilt if the kill came before it) and
points `latest` at it. A resume from the checkpoint at train.steps finishes the run (fingerprints,
export). A checkpoint that cannot be written stops the run (TrainingStopped, naming the cause and
the last good checkpoint), and on every way out the DataLoader workers are shut down before the
exception leaves, so pretrain.py can end at once.

A resumed run continues with the same batches (the sampler position is in the checkpoint), the
same dropout draws (RNG states per rank) and the same schedule, so its losses equal those of an
uninterrupted run (bit for bit on the CPU in float32).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bert_fast import fp8
from bert_fast.fileio import atomic_write_text
from bert_fast.labels import IGNORE_INDEX
from bert_fast.train import checkpoint, leftovers
from bert_fast.train.batches import make_batches
from bert_fast.train.compiled import check_compile, compile_model
from bert_fast.train.config import (
    batch_plan,
    checkpoint_dir,
    deepspeed_config,
    dump_config,
    load_deepspeed_config,
    merge_deepspeed_config,
    model_config,
)
from bert_fast.train.engine import build, global_grad_norm, init_distributed, loss_scale
from bert_fast.train.flops import peak_tflops, step_flops
from bert_fast.train.metrics import Reporter, Window, checkpoint_record, repair_for_resume
from bert_fast.train.output import RECIPE, claim
from bert_fast.train.preflight import check_export_dir, check_start, find_start
from bert_fast.train.stops import FiniteWatch, LossScaleWatch, Signals, TrainingStopped, agree

__all__ = ["LossScaleWatch", "Outcome", "TrainingStopped", "evaluate", "rank_fingerprints", "train"]

# A packed loader batch (bert_fast/data/packing.py): these tensors, max_seqlen and host counts.
MODEL_KEYS = ("input_ids", "token_type_ids", "cu_seqlens", "mlm_positions", "mlm_labels",
              "next_sentence_label")


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _to_device(batch: dict, device: torch.device) -> dict:
    """The model's arguments: checked by the loader already, so the forward reads nothing back."""
    return {**{k: batch[k].to(device, non_blocking=True) for k in MODEL_KEYS},
            "max_seqlen": batch["max_seqlen"], "validate": False}


def _batch_flops(model_cfg, batch: dict) -> float:
    """From the host batch (before it goes to the device): its real lengths and MLM targets."""
    lengths = np.diff(batch["cu_seqlens"].numpy()[:batch["sequences"] + 1])  # numpy: not a tensor read
    return step_flops(model_cfg, lengths.tolist(), int((batch["mlm_labels"].numpy() != IGNORE_INDEX).sum()))


def rank_fingerprints(engine, world_size: int) -> list[float]:
    """A float64 checksum of the full parameters as each rank sees them (ZeRO-3 gathers them):
    data-parallel ranks that disagree have silently diverged."""
    params = list(engine.module.parameters())
    gathered = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params)
    with gathered:
        local = sum(float(p.detach().double().mul(i + 1).sum()) for i, p in enumerate(params))
    if world_size == 1:
        return [local]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local)
    return gathered


def evaluate(engine, batches, count: int, device: torch.device, world_size: int) -> dict:
    """MLM and NSP loss and accuracy on the same `count` held-out batches every time."""
    loader = batches.eval
    loader.load_state_dict({"epoch": 0, "consumed": 0, "seed": loader.sampler.seed})
    window = Window(device)
    engine.eval()
    with torch.no_grad():
        for _, batch in zip(range(count), loader):
            inputs = _to_device(batch, device)
            window.add(engine(**inputs), inputs, batch, 0.0)
    engine.train()
    s = window.summary(world_size)
    return {k: s[k] for k in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc")}


@dataclass
class Outcome:
    """What a run leaves: its train log records (rank 0; [] elsewhere), folders and files."""

    records: list[dict]
    output_dir: Path
    checkpoint: Path | None  # the last one saved
    export: Path | None  # export.hf_dir, when the run exported


def train(config: dict, resume: str | None = None, deepspeed_config_path: str | None = None,
          stream=None, overwrite: bool = False) -> Outcome:
    """Runs the configured steps (from a checkpoint with `resume`: 'auto' or a path) in an output
    folder that holds no other run (`overwrite` moves one aside; bert_fast/train/output.py).
    Rank 0 also writes the records to metrics.jsonl and TensorBoard."""
    rank, world, device = init_distributed()
    t, c, lg = config["train"], config["checkpoint"], config["log"]
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    micro, accumulation, global_batch = batch_plan(config, world)
    ds_config = deepspeed_config(config, world)
    if deepspeed_config_path:
        ds_config = merge_deepspeed_config(ds_config, load_deepspeed_config(deepspeed_config_path))
    root, output = checkpoint_dir(config), Path(t["output_dir"])
    reads = {"checkpoint.init_from": c["init_from"], "data.source": config["data"]["source"],
             "data.eval_source": config["data"]["eval_source"]}  # what --overwrite must not move away
    moves = claim(output, root, resume, overwrite, reads)
    for folder, aside in moves if rank == 0 else []:
        print(f"pretrain: moved the earlier run in {folder} to {aside}", file=stream or sys.stdout,
              flush=True)
    if rank == 0:  # before any rank reads there: the others wait for find_start's broadcast
        removed = leftovers.remove(output, root, config["export"]["hf_dir"])
        if removed:
            print(f"pretrain: removed what a killed run left: {', '.join(map(str, removed))}",
                  file=stream or sys.stdout, flush=True)
    check_export_dir(config["export"]["hf_dir"])
    # A bad checkpoint fails before the build, on every rank alike.
    kind, path, meta = find_start(root, resume, c["init_from"])
    batches = make_batches(config, model_config(config), rank, world)
    model_cfg = batches.model_config
    if kind is not None:
        check_start(kind, path, meta, model_cfg, t["steps"], global_batch, config["precision"])
    check_compile(config, device)
    if config["precision"]["fp8"]:
        fp8.check_device(device)
    engine, scheduler = build(config, model_cfg, ds_config, device)
    compile_model(engine.module, config)

    start, last_saved = 0, None
    if kind == "resume":  # validated on rank 0 by find_start: not hashed again
        state = checkpoint.load(engine, path, validated=meta)
        start, last_saved = state["step"], path
        batches.load_state_dict(state["data"])
    elif kind == "init_from":
        checkpoint.load(engine, path, load_optimizer=False, validated=meta)
    if rank == 0:
        if resume:  # what the run logged after its checkpoint (all of it, if none) is logged again
            repair_for_resume(output, start, last_saved)
        if kind == "resume":
            checkpoint.point_latest(root, path)
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / RECIPE, dump_config(config))
        print(f"pretrain: {world} rank(s) on {device.type}, global batch {global_batch} = {micro} x "
              f"{accumulation} accumulation x {world}, ZeRO {engine.zero_optimization_stage()}, "
              f"{'bf16' if engine.bfloat16_enabled() else 'fp16' if engine.fp16_enabled() else 'fp32'}, "
              + (f"resumed from {path} at step {start}" if kind == "resume" else
                 f"weights from {path}" if kind == "init_from" else "from scratch")
              + (" (the last step: nothing left to train, finishing the run)" if start == t["steps"] else ""),
              file=stream or sys.stdout, flush=True)

    def save(step: int) -> Path:
        state = {"step": step, "data": batches.state_dict(), "config": config,
                 "model_config": model_cfg.to_dict(), "global_batch": global_batch}
        try:
            return checkpoint.save(engine, root, step, state, keep=c["keep"])
        except checkpoint.CheckpointError as err:
            raise TrainingStopped(f"step {step}: checkpoint not saved: {err}. The last good checkpoint "
                                  f"is {last_saved or 'none'}") from None

    peak = peak_tflops(device, lg["peak_tflops"])
    reporter = Reporter(output, rank, t["steps"], start, lg["tensorboard"], stream, resumed=bool(resume))
    signals = Signals()
    stream_ = batches.stream()
    window, records = Window(device), []
    watch = LossScaleWatch(config["precision"]["min_loss_scale"], config["precision"]["hysteresis"])
    finite = FiniteWatch(device)

    def evaluates(n: int) -> bool:
        return bool(batches.eval is not None and config["eval"]["every"]
                    and (n % config["eval"]["every"] == 0 or n == t["steps"]))

    def checks(n: int) -> bool:  # the steps that read the device anyway, and every check_every
        return (n % t["check_every"] == 0 or n % lg["every"] == 0 or n == t["steps"] or evaluates(n)
                or bool(c["every"] and n % c["every"] == 0))

    step = start
    try:
        while step < t["steps"]:
            skipped_before, step_lr = engine.skipped_steps, scheduler.get_last_lr()[0]
            step_loss = torch.zeros((), device=device)
            stop = False
            for i in range(accumulation):
                batch = next(stream_)
                inputs = _to_device(batch, device)
                out = engine(**inputs)
                engine.backward(out.loss)
                step_loss += out.loss.detach().float()
                window.add(out, inputs, batch, _batch_flops(model_cfg, batch))
                if i == accumulation - 1:
                    finite.add(step + 1, step_loss)
                    if checks(step + 1):
                        first = finite.read()
                        nonfinite, stop = agree(first > 0, signals.received is not None, world, device)
                        if nonfinite:
                            raise TrainingStopped(_nonfinite_message(first, step + 1, last_saved))
                try:
                    engine.step()
                except Exception as err:  # DeepSpeed's scaler raises once the scale is at its minimum
                    if "loss scale" not in str(err).lower():
                        raise
                    raise TrainingStopped(f"step {step + 1}: {err} (precision.min_loss_scale="
                                          f"{config['precision']['min_loss_scale']}); the run has diverged, "
                                          f"last good checkpoint: {last_saved or 'none'}. Use bf16, "
                                          "or a lower optimizer.lr / longer warmup.") from err
            step += 1
            overflowed = engine.skipped_steps > skipped_before
            scale = loss_scale(engine)
            watch.update(step, overflowed, scale, last_saved)
            reporter.step()
            if step % lg["every"] == 0 or step == t["steps"]:
                record = {"step": step, **window.summary(world, peak), "lr": step_lr,
                          "grad_norm": global_grad_norm(engine), "loss_scale": scale,
                          "skipped_steps": int(engine.skipped_steps),
                          "peak_memory_gb": _peak_memory_gb(device)}
                records.append(record)
                reporter.record(record)
                window.reset()
            paused = time.perf_counter()  # evaluation and checkpoints are not training throughput
            if evaluates(step):
                scores = evaluate(engine, batches, config["eval"]["batches"], device, world)
                reporter.record({"step": step, **scores}, kind="eval")
            if stop or step == t["steps"] or (c["every"] and step % c["every"] == 0):
                last_saved = save(step)
                if rank == 0:
                    reporter.record(checkpoint_record(step, last_saved), kind="checkpoint")
            window.exclude(time.perf_counter() - paused)
            if stop:
                if rank == 0:
                    print(f"pretrain: {signals.received or 'a signal on another rank'}: saved {last_saved} "
                          f"at step {step}; resume with --resume auto", file=stream or sys.stdout, flush=True)
                break
        if step == t["steps"]:
            fingerprints = rank_fingerprints(engine, world)
            reporter.record({"step": step, "fingerprints": fingerprints,
                             "agree": len(set(fingerprints)) == 1}, kind="ranks")
            if len(set(fingerprints)) != 1:
                raise TrainingStopped(f"the ranks' parameters differ at the end of training: {fingerprints}")
    finally:  # on every way out: the DataLoader workers (which ignore SIGTERM) go now, not at exit
        if hasattr(stream_, "close"):
            stream_.close()
        signals.restore()
        reporter.close()
    exported = None
    if step == t["steps"] and config["export"]["hf_dir"] and last_saved is not None:
        exported = _export(last_saved, config["export"]["hf_dir"], rank, stream)
    return Outcome(records if rank == 0 else [], output, last_saved, exported)


def _nonfinite_message(first: int, checked: int, last_saved: Path | None) -> str:
    """first: this rank's first step with a non-finite loss (0: another rank's)."""
    where = (f"step {first}: the loss is not finite" if first else
             f"step {checked}: another rank's loss is not finite")
    if first and first < checked:
        where += f" (found at the check of step {checked}; the steps between were applied)"
    else:
        where += "; stopping before the optimizer applies it"
    return (f"{where}. The last good checkpoint is {last_saved or 'none'}. "
            "Lower optimizer.lr, raise schedule warmup, or use precision.bf16.")


def _export(saved: Path, hf_dir: str, rank: int, stream) -> Path:
    """Collective: rank 0 exports, every rank learns its outcome and raises alike."""
    error = None
    if rank == 0:
        try:
            from bert_fast.export import export_checkpoint

            folder = export_checkpoint(saved, hf_dir)
            print(f"pretrain: exported {folder}", file=stream or sys.stdout, flush=True)
        except Exception as err:  # the other ranks must not wait for an export that failed
            error = f"{type(err).__name__}: {err}"
    error = checkpoint.from_rank0(error)
    if error is not None:
        raise checkpoint.CheckpointError(f"export.hf_dir={hf_dir}: exporting {saved} failed on rank 0: "
                                         f"{error}")
    return Path(hf_dir)
