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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bert_fast.fileio import atomic_write_text
from bert_fast.labels import IGNORE_INDEX
from bert_fast.ops import fp8
from bert_fast.train import checkpoint, checkpoint_load, dist, leftovers
from bert_fast.train.batches import make_batches, model_for_data
from bert_fast.train.checkpoint_manifest import CheckpointError
from bert_fast.train.compiled import check_compile, compile_model
from bert_fast.train.config import batch_plan, checkpoint_dir, dump_config, model_config
from bert_fast.train.deepspeed_compat import global_grad_norm, loss_scale
from bert_fast.train.deepspeed_json import deepspeed_config, load_deepspeed_config, merge_deepspeed_config
from bert_fast.train.engine import build, init_distributed
from bert_fast.train.flops import peak_tflops, step_flops
from bert_fast.train.metrics import Reporter, Window, checkpoint_record, repair_for_resume
from bert_fast.train.output import RECIPE, claim
from bert_fast.train.preflight import check_export_dir, check_start, find_start
from bert_fast.train.recipe import Recipe
from bert_fast.train.stops import FiniteWatch, LossScaleWatch, Signals, TrainingStopped

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
    return dist.all_ranks(local) if world_size > 1 else [local]


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


def train(recipe: Recipe, resume: str | None = None, deepspeed_config_path: str | None = None,
          stream=None, overwrite: bool = False) -> Outcome:
    """Runs the configured steps (from a checkpoint with `resume`: 'auto' or a path) in an output
    folder that holds no other run (`overwrite` moves one aside; bert_fast/train/output.py).
    Rank 0 also writes the records to metrics.jsonl and TensorBoard."""
    run = _start(recipe, resume, deepspeed_config_path, stream, overwrite)
    records = _run_steps(run, resume)
    exported, hf_dir = None, recipe.export.hf_dir
    if run.step == recipe.train.steps and hf_dir and run.last_saved is not None:
        exported = _export(run.last_saved, hf_dir, run.rank, stream)
    return Outcome(records if run.rank == 0 else [], run.output, run.last_saved, exported)


@dataclass
class _Run:
    """One run's settings, engine and data, where it writes, and how far it has come."""

    recipe: Recipe
    rank: int
    world: int
    device: torch.device
    engine: object
    scheduler: object
    batches: object  # train/batches.py Batches
    model_cfg: object  # the model the data needs (batches.model_for_data)
    root: Path  # the checkpoint folder
    output: Path
    global_batch: int
    accumulation: int
    stream: object  # where rank 0 prints (None: stdout)
    step: int = 0
    last_saved: Path | None = None
    fp8_states: list = field(default_factory=list)  # precision.fp8's scaling states (ops/fp8.py)

    def say(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def evaluates(self, n: int) -> bool:
        every = self.recipe.eval.every
        return bool(self.batches.eval is not None and every
                    and (n % every == 0 or n == self.recipe.train.steps))

    def saves(self, n: int) -> bool:
        every = self.recipe.checkpoint.every
        return n == self.recipe.train.steps or bool(every and n % every == 0)

    def checks(self, n: int) -> bool:
        """The steps that read the device anyway (log, eval, checkpoint), and every check_every."""
        return (n % self.recipe.train.check_every == 0 or n % self.recipe.log.every == 0 or self.saves(n)
                or self.evaluates(n))

    def save(self, step: int) -> Path:
        state = {"step": step, "data": self.batches.state_dict(), "config": self.recipe.to_dict(),
                 "model_config": self.model_cfg.to_dict(), "global_batch": self.global_batch}
        try:
            return checkpoint.save(self.engine, self.root, step, state,
                                   keep=self.recipe.checkpoint.keep)
        except CheckpointError as err:
            raise TrainingStopped(f"step {step}: checkpoint not saved: {err}. The last good checkpoint "
                                  f"is {self.last_saved or 'none'}") from None


def _start(recipe: Recipe, resume, deepspeed_config_path, stream, overwrite: bool) -> _Run:
    """Process group, output folders, the checkpoint to start from (checked before the build, on
    every rank alike), data, engine; then the resumed state and, on rank 0, the run's files."""
    rank, world, device = init_distributed()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    micro, accumulation, global_batch = batch_plan(recipe, world)
    ds_config = deepspeed_config(recipe, world)
    if deepspeed_config_path:
        ds_config = merge_deepspeed_config(ds_config, load_deepspeed_config(deepspeed_config_path))
    root, output = checkpoint_dir(recipe), Path(recipe.train.output_dir)
    _claim_folders(recipe, root, output, resume, overwrite, rank, stream)
    check_export_dir(recipe.export.hf_dir)
    kind, path, meta = find_start(root, resume, recipe.checkpoint.init_from)
    model_cfg = model_config(recipe)
    batches = make_batches(recipe, model_cfg, rank, world)
    model_cfg = model_for_data(model_cfg, batches)
    if kind is not None:
        check_start(kind, path, meta, model_cfg, recipe.train.steps, global_batch, recipe.precision)
    check_compile(recipe, device)
    if recipe.precision.fp8:
        fp8.check_device(device)
    engine, scheduler = build(recipe, model_cfg, ds_config, device)
    compile_model(engine.module, recipe)
    run = _Run(recipe, rank, world, device, engine, scheduler, batches, model_cfg, root, output,
               global_batch, accumulation, stream)
    run.fp8_states = fp8.states_of(engine.module)
    if kind == "resume":  # validated on rank 0 by find_start: not hashed again
        state = checkpoint_load.load(engine, path, validated=meta)
        run.step, run.last_saved = state["step"], path
        batches.load_state_dict(state["data"])
    elif kind == "init_from":
        checkpoint_load.load(engine, path, load_optimizer=False, validated=meta)
    if rank == 0:
        _prepare_output(run, resume, kind, path, micro)
    return run


def _claim_folders(recipe: Recipe, root: Path, output: Path, resume, overwrite: bool, rank: int,
                   stream) -> None:
    """Collective: the output folders become this run's (output.claim), and rank 0 removes what a
    killed run left there, before any rank reads them (the others wait in find_start's broadcast)."""
    # What --overwrite must not move away.
    reads = {"checkpoint.init_from": recipe.checkpoint.init_from,
             "data.source": recipe.data.source, "data.eval_source": recipe.data.eval_source}
    moves = claim(output, root, resume, overwrite, reads)
    if rank != 0:
        return
    for folder, aside in moves:
        print(f"pretrain: moved the earlier run in {folder} to {aside}", file=stream or sys.stdout,
              flush=True)
    removed = leftovers.remove(output, root, recipe.export.hf_dir)
    if removed:
        print(f"pretrain: removed what a killed run left: {', '.join(map(str, removed))}",
              file=stream or sys.stdout, flush=True)


def _prepare_output(run: _Run, resume, kind, path, micro: int) -> None:
    """Rank 0: metrics.jsonl as it stood at the checkpoint, `latest`, the recipe, one line on the run."""
    if resume:  # what the run logged after its checkpoint (all of it, if none) is logged again
        repair_for_resume(run.output, run.step, run.last_saved)
    if kind == "resume":
        checkpoint.point_latest(run.root, path)
    run.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.output / RECIPE, dump_config(run.recipe))
    engine = run.engine
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    origin = (f"resumed from {path} at step {run.step}" if kind == "resume" else
              f"weights from {path}" if kind == "init_from" else "from scratch")
    done = run.step == run.recipe.train.steps
    last = " (the last step: nothing left to train, finishing the run)" if done else ""
    run.say(f"pretrain: {run.world} rank(s) on {run.device.type}, global batch {run.global_batch} = "
            f"{micro} x {run.accumulation} accumulation x {run.world}, "
            f"ZeRO {engine.zero_optimization_stage()}, "
            f"{precision}, {origin}{last}")


@dataclass
class _Meters:
    """What the step loop keeps beside the run: progress and logs, per-step sums, the watches."""

    reporter: Reporter
    window: Window
    watch: LossScaleWatch
    finite: FiniteWatch
    signals: Signals
    peak: float | None
    records: list
    fp8_grads: fp8.LossScaleFollower  # fp16: FP8 gradient scaling follows the loss scale


def _run_steps(run: _Run, resume) -> list[dict]:
    """The steps from run.step to train.steps, or to a stop; returns the train records."""
    steps, lg, p = run.recipe.train.steps, run.recipe.log, run.recipe.precision
    m = _Meters(Reporter(run.output, run.rank, steps, run.step, lg.tensorboard, run.stream,
                         resumed=bool(resume)),
                Window(run.device), LossScaleWatch(p.min_loss_scale, p.hysteresis),
                FiniteWatch(run.device), Signals(), peak_tflops(run.device, lg.peak_tflops), [],
                fp8.LossScaleFollower(run.fp8_states, loss_scale(run.engine)))
    stream = run.batches.stream()
    try:
        while run.step < steps:
            skipped_before, lr = run.engine.skipped_steps, run.scheduler.get_last_lr()[0]
            stop = _step(run, stream, m)
            run.step += 1
            _after_step(run, m, stop, skipped_before, lr)
            if stop:
                break
        if run.step == steps:
            fingerprints = rank_fingerprints(run.engine, run.world)
            m.reporter.record({"step": run.step, "fingerprints": fingerprints,
                               "agree": len(set(fingerprints)) == 1}, kind="ranks")
            if len(set(fingerprints)) != 1:
                raise TrainingStopped(f"the ranks' parameters differ at the end of training: {fingerprints}")
    finally:  # on every way out: the DataLoader workers (which ignore SIGTERM) go now, not at exit
        if hasattr(stream, "close"):
            stream.close()
        m.signals.restore()
        m.reporter.close()
    return m.records


def _step(run: _Run, stream, m: _Meters) -> bool:
    """One optimizer step of `accumulation` micro batches; True when a signal stops the run here."""
    engine, stop = run.engine, False
    step_loss = torch.zeros((), device=run.device)
    for i in range(run.accumulation):
        batch = next(stream)
        inputs = _to_device(batch, run.device)
        out = engine(**inputs)
        engine.backward(out.loss)
        fp8.reduce_amaxes(run.fp8_states)  # every rank's amaxes for the next forward's roll
        step_loss += out.loss.detach().float()
        m.window.add(out, inputs, batch, _batch_flops(run.model_cfg, batch))
        if i == run.accumulation - 1:
            stop = _check(run, m, step_loss)
        try:
            engine.step()
        except Exception as err:  # DeepSpeed's scaler raises once the scale is at its minimum
            if "loss scale" not in str(err).lower():
                raise
            raise TrainingStopped(f"step {run.step + 1}: {err} (precision.min_loss_scale="
                                  f"{run.recipe.precision.min_loss_scale}); the run has diverged, "
                                  f"last good checkpoint: {run.last_saved or 'none'}. Use bf16, "
                                  "or a lower optimizer.lr / longer warmup.") from err
    return stop


def _check(run: _Run, m: _Meters, step_loss: torch.Tensor) -> bool:
    """Before the optimizer applies step run.step + 1: keeps its loss's finiteness on the device;
    at a checked step reads it and agrees with every rank on non-finite losses and signals."""
    n = run.step + 1
    m.finite.add(n, step_loss)
    if not run.checks(n):
        return False
    first = m.finite.read()
    nonfinite, stop = dist.any_rank([first > 0, m.signals.received is not None], run.device)
    if nonfinite:
        raise TrainingStopped(_nonfinite_message(first, n, run.last_saved))
    return stop


def _after_step(run: _Run, m: _Meters, stop: bool, skipped_before: int, lr: float) -> None:
    """The loss-scale watch, the log record, evaluation and the checkpoint of step run.step."""
    engine, step = run.engine, run.step
    scale = loss_scale(engine)
    m.fp8_grads.update(scale)
    m.watch.update(step, engine.skipped_steps > skipped_before, scale, run.last_saved)
    m.reporter.step()
    if step % run.recipe.log.every == 0 or step == run.recipe.train.steps:
        record = {"step": step, **m.window.summary(run.world, m.peak), "lr": lr,
                  "grad_norm": global_grad_norm(engine), "loss_scale": scale,
                  "skipped_steps": int(engine.skipped_steps), "peak_memory_gb": _peak_memory_gb(run.device)}
        m.records.append(record)
        m.reporter.record(record)
        m.window.reset()
    paused = time.perf_counter()  # evaluation and checkpoints are not training throughput
    if run.evaluates(step):
        scores = evaluate(engine, run.batches, run.recipe.eval.batches, run.device, run.world)
        m.reporter.record({"step": step, **scores}, kind="eval")
    if stop or run.saves(step):
        run.last_saved = run.save(step)
        if run.rank == 0:
            m.reporter.record(checkpoint_record(step, run.last_saved), kind="checkpoint")
    m.window.exclude(time.perf_counter() - paused)
    if stop and run.rank == 0:
        run.say(f"pretrain: {m.signals.received or 'a signal on another rank'}: saved {run.last_saved} "
                f"at step {step}; resume with --resume auto")


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
            from bert_fast.train.export import export_checkpoint

            folder = export_checkpoint(saved, hf_dir)
            print(f"pretrain: exported {folder}", file=stream or sys.stdout, flush=True)
        except Exception as err:  # the other ranks must not wait for an export that failed
            error = f"{type(err).__name__}: {err}"
    error = dist.from_rank0(error)
    if error is not None:
        raise CheckpointError(f"export.hf_dir={hf_dir}: exporting {saved} failed on rank 0: "
                                         f"{error}")
    return Path(hf_dir)
