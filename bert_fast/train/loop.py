"""The training loop: DeepSpeed engine steps with gradient accumulation, evaluation, checkpoints,
signals, stability checks and metrics.

Per optimizer step: `accumulation` micro batches (forward, `engine.backward`, `engine.step`, which
applies the optimizer at the accumulation boundary); the step's loss is checked for NaN/inf before
the optimizer runs, so a diverged run stops with its weights and checkpoints still good. fp16 steps
that overflow are skipped by DeepSpeed's loss scaler, counted and logged; a run whose scale has
fallen to `precision.min_loss_scale` and still overflows is stopped. SIGTERM/SIGINT finish the
step in flight, save a checkpoint and end the run normally (every rank agrees through an
all-reduce, so ranks signalled at different steps still stop at the same one).

A resumed run continues with the same batches (the sampler position is in the checkpoint), the
same dropout draws (RNG states per rank) and the same schedule, so its losses equal those of an
uninterrupted run (bit for bit on the CPU in float32).
"""

from __future__ import annotations

import resource
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bert_fast.train import checkpoint
from bert_fast.train.batches import make_batches
from bert_fast.train.config import (
    batch_plan,
    checkpoint_dir,
    deepspeed_config,
    load_deepspeed_config,
    merge_deepspeed_config,
    model_config,
)
from bert_fast.train.engine import build, global_grad_norm, init_distributed, loss_scale
from bert_fast.train.flops import peak_tflops, step_flops
from bert_fast.train.metrics import Reporter, Window

MODEL_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "next_sentence_label")


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss, collapsed loss scale); the message says why."""


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop stops at the end of the step. A second SIGINT
    interrupts at once (the handler is removed after the first)."""

    def __init__(self):
        self.received = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def any_rank(self, world_size: int, device: torch.device) -> bool:
        flag = self.received is not None
        if world_size > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class LossScaleWatch:
    """Stops a fp16 run whose dynamic loss scale sits at its floor and still overflows for
    `patience` steps in a row: the scaler cannot go lower, so every step is being skipped."""

    def __init__(self, floor: float, patience: int):
        self.floor, self.patience, self.count = floor, max(1, patience), 0

    def update(self, step: int, overflowed: bool, scale: float | None, last_saved) -> None:
        if not overflowed or scale is None:
            self.count = 0
            return
        self.count = self.count + 1 if scale <= self.floor else 0
        if self.count >= self.patience:
            raise TrainingStopped(
                f"step {step}: the fp16 loss scale is at its floor precision.min_loss_scale={self.floor} "
                f"and the last {self.count} steps overflowed; the run has diverged (last good "
                f"checkpoint: {last_saved or 'none'}). Use precision.bf16, or a lower optimizer.lr / "
                "longer warmup.")


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_KEYS}


def _batch_flops(model_cfg, batch: dict) -> float:
    lengths = batch["attention_mask"].sum(1)
    return step_flops(model_cfg, lengths, int((batch["mlm_labels"] != -100).sum()))


def _init_from(engine, source: str) -> Path:
    """Phase 2: the weights of a phase-1 checkpoint (a checkpoint folder, or a root whose newest
    valid one is taken), fresh optimizer and schedule."""
    path = Path(source)
    if not (path / checkpoint.MANIFEST).exists():
        found = checkpoint.resolve_resume(path, "auto")
        if found is None:
            raise checkpoint.CheckpointError(f"checkpoint.init_from={source}: no valid checkpoint there")
        path = found
    checkpoint.load(engine, path, load_optimizer=False)
    return path


def rank_fingerprints(engine, world_size: int) -> list[float]:
    """A float64 checksum of the full parameters as each rank sees them (ZeRO-3 gathers them):
    data-parallel ranks that disagree have silently diverged."""
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            local = sum(float(p.detach().double().mul(i + 1).sum()) for i, p in enumerate(params))
    else:
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
            batch = _to_device(batch, device)
            window.add(engine(**batch), batch, 0.0)
    engine.train()
    s = window.summary(world_size)
    return {k: s[k] for k in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc")}


def train(config: dict, resume: str | None = None, deepspeed_config_path: str | None = None,
          stream=None) -> list[dict]:
    """Runs the configured steps (from a checkpoint with `resume`: 'auto' or a path); returns the
    train log records (rank 0 also writes them to metrics.jsonl and TensorBoard)."""
    rank, world, device = init_distributed()
    t, c, lg = config["train"], config["checkpoint"], config["log"]
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    micro, accumulation, global_batch = batch_plan(config, world)
    ds_config = deepspeed_config(config, world)
    if deepspeed_config_path:
        ds_config = merge_deepspeed_config(ds_config, load_deepspeed_config(deepspeed_config_path))
    root, output = checkpoint_dir(config), Path(t["output_dir"])
    path = checkpoint.resolve_resume(root, resume) if resume else None  # a bad one fails before the build
    batches = make_batches(config, model_config(config), rank, world)
    model_cfg = batches.model_config
    engine, scheduler = build(config, model_cfg, ds_config, device)

    start, last_saved = 0, None
    if path is not None:
        state = checkpoint.load(engine, path)
        start, last_saved = state["step"], path
        batches.load_state_dict(state["data"])
    elif c["init_from"]:
        _init_from(engine, c["init_from"])
    if rank == 0:
        print(f"pretrain: {world} rank(s) on {device.type}, global batch {global_batch} = {micro} x "
              f"{accumulation} accumulation x {world}, ZeRO {engine.zero_optimization_stage()}, "
              f"{'bf16' if engine.bfloat16_enabled() else 'fp16' if engine.fp16_enabled() else 'fp32'}, "
              + (f"resumed from {path} at step {start}" if path else "from scratch"),
              file=stream or sys.stdout, flush=True)

    def save(step: int) -> Path:
        state = {"step": step, "data": batches.state_dict(), "config": config,
                 "model_config": model_cfg.to_dict(), "global_batch": global_batch}
        return checkpoint.save(engine, root, step, state, keep=c["keep"])

    peak = peak_tflops(device, lg["peak_tflops"])
    reporter = Reporter(output, rank, t["steps"], start, lg["tensorboard"], stream)
    signals = _Signals()
    stream_ = batches.stream()
    window, records = Window(device), []
    watch = LossScaleWatch(config["precision"]["min_loss_scale"], config["precision"]["hysteresis"])
    step = start
    try:
        while step < t["steps"]:
            skipped_before, step_lr = engine.skipped_steps, scheduler.get_last_lr()[0]
            step_loss = torch.zeros((), device=device)
            for i in range(accumulation):
                batch = next(stream_)
                flops = _batch_flops(model_cfg, batch)
                batch = _to_device(batch, device)
                out = engine(**batch)
                engine.backward(out.loss)
                step_loss += out.loss.detach().float()
                window.add(out, batch, flops)
                if i == accumulation - 1 and not torch.isfinite(step_loss):
                    raise TrainingStopped(
                        f"step {step + 1}: the loss is {step_loss.item()} (not finite); stopping before the "
                        f"optimizer applies it. The last good checkpoint is {last_saved or 'none'}. "
                        "Lower optimizer.lr, raise schedule warmup, or use precision.bf16.")
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
                record = {"step": step, **window.summary(world), "lr": step_lr,
                          "grad_norm": global_grad_norm(engine), "loss_scale": scale,
                          "skipped_steps": int(engine.skipped_steps),
                          "peak_memory_gb": _peak_memory_gb(device)}
                if peak:
                    record["mfu_pct"] = 100 * record["tflops"] / peak
                records.append(record)
                reporter.record(record)
                window.reset()
            if batches.eval is not None and config["eval"]["every"] and (
                    step % config["eval"]["every"] == 0 or step == t["steps"]):
                scores = evaluate(engine, batches, config["eval"]["batches"], device, world)
                reporter.record({"step": step, **scores}, kind="eval")
            stop = signals.any_rank(world, device)
            if stop or step == t["steps"] or (c["every"] and step % c["every"] == 0):
                last_saved = save(step)
                if rank == 0:
                    reporter.record({"step": step, "checkpoint": str(last_saved)}, kind="checkpoint")
            if stop:
                if rank == 0:
                    print(f"pretrain: {signals.received or 'a signal on another rank'}: saved {last_saved} "
                          f"at step {step}; resume with --resume auto", file=stream or sys.stdout, flush=True)
                break
    except BaseException:
        reporter.close()
        raise
    finally:
        signals.restore()
    if step == t["steps"]:
        fingerprints = rank_fingerprints(engine, world)
        reporter.record({"step": step, "fingerprints": fingerprints, "agree": len(set(fingerprints)) == 1},
                        kind="ranks")
        if len(set(fingerprints)) != 1:
            raise TrainingStopped(f"the ranks' parameters differ at the end of training: {fingerprints}")
    reporter.close()
    if step == t["steps"] and config["export"]["hf_dir"] and last_saved is not None:
        if rank == 0:
            from bert_fast.export import export_checkpoint

            folder = export_checkpoint(last_saved, config["export"]["hf_dir"])
            print(f"pretrain: exported {folder}", file=stream or sys.stdout, flush=True)
        dist.barrier()
    return records if rank == 0 else []
