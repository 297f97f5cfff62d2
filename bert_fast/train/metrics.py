"""What a run reports: a progress bar on rank 0, and every log interval one JSONL record
(`<output_dir>/metrics.jsonl`) and TensorBoard scalars (`<output_dir>/tensorboard`).

Per-step values stay on the device as tensors and are summed there; they reach the host once
per log interval, so logging costs no synchronisation per step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from bert_fast.fileio import atomic_write_text
from bert_fast.labels import IGNORE_INDEX
from bert_fast.train.diskspace import write_error
from bert_fast.train.output import METRICS

# Summed per micro batch on the device: losses weighted by their counts, so means are exact.
DEVICE_SUMS = ("loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "nsp_correct", "nsp_count")
# Known on the host already (the loader counts real tokens and sequences, the FLOP formula):
# summed there, no copy per step.
HOST_SUMS = ("sequences", "tokens", "flops")


class Window:
    """Running sums over one log interval, on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(DEVICE_SUMS), dtype=torch.float64, device=self.device)
        self.host_sums = [0.0] * len(HOST_SUMS)
        self.micro_steps = 0
        self.start = time.perf_counter()
        self.excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (evaluation, checkpointing) out of the window's wall time."""
        self.excluded += seconds

    def add(self, out, inputs: dict, batch: dict, flops: float) -> None:
        """`inputs`: the model's arguments (on the device); `batch`: the packed loader batch they
        came from, whose host counts `sequences` and `tokens` are summed on the host."""
        mlm_count = out.mlm_predictions.double()
        nsp_count = (inputs["next_sentence_label"] != IGNORE_INDEX).sum().double()
        self.sums += torch.stack([
            out.loss.detach().double(), out.mlm_loss.detach().double(), out.nsp_loss.detach().double(),
            out.mlm_accuracy.detach().double() * mlm_count, mlm_count,
            out.nsp_accuracy.detach().double() * nsp_count, nsp_count])
        self.host_sums[0] += batch["sequences"]
        self.host_sums[1] += batch["tokens"]
        self.host_sums[2] += flops
        self.micro_steps += 1

    def summary(self, world_size: int, peak_tflops: float | None = None) -> dict:
        """Means over every rank (an all-reduce) and rates over the wall time of the window, less
        the excluded time. Rates are of the whole job (`tflops`: every rank's FLOPs);
        `tflops_per_gpu` divides by the world size, and MFU compares that with one device's peak."""
        host = torch.tensor(self.host_sums, dtype=torch.float64).to(self.device)
        sums = torch.cat([self.sums, host])
        if dist.is_initialized() and world_size > 1:
            dist.all_reduce(sums)
        s = dict(zip(DEVICE_SUMS + HOST_SUMS, sums.tolist()))
        seconds = max(1e-9, time.perf_counter() - self.start - self.excluded)
        n = max(1, self.micro_steps * world_size)
        return {"loss": s["loss"] / n, "mlm_loss": s["mlm_loss"] / n, "nsp_loss": s["nsp_loss"] / n,
                "mlm_acc": s["mlm_correct"] / max(1.0, s["mlm_count"]),
                "nsp_acc": s["nsp_correct"] / max(1.0, s["nsp_count"]),
                "seq_per_s": s["sequences"] / seconds, "tokens_per_s": s["tokens"] / seconds,
                "tflops": s["flops"] / seconds / 1e12,
                "tflops_per_gpu": s["flops"] / seconds / 1e12 / max(1, world_size),
                **({"mfu_pct": 100 * s["flops"] / seconds / 1e12 / (peak_tflops * max(1, world_size))}
                   if peak_tflops else {})}


def _finite(value):
    """JSON has no NaN/Infinity (json.dumps writes them, strict parsers refuse them): null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _line(kind: str, record: dict) -> str:
    """One metrics.jsonl line: full precision (resumed runs are compared bit for bit), no NaN."""
    return json.dumps(_finite({"kind": kind, **record}), allow_nan=False) + "\n"


def checkpoint_record(step: int, path) -> dict:
    return {"step": step, "checkpoint": str(path)}


def repair_for_resume(output_dir: Path, step: int, saved: Path | None) -> None:
    """Rank 0, before a resumed run logs: metrics.jsonl as the run left it at `step`, where its
    checkpoint `saved` was taken (0 and None: no checkpoint, the run starts over), whatever kill
    came before. Kept: the records of steps up to `step`, each kind of each step once, in the
    order written. Dropped: what the killed run logged after its checkpoint (it is logged again),
    a line cut short, and the end-of-run record of `step` ('ranks', written after the final
    checkpoint, written again). Added: the checkpoint's record, when a kill came between the
    checkpoint's rename and its record. Rewritten atomically, and only when something changes."""
    path = Path(output_dir) / METRICS
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    kept, seen = [], set()
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line the kill cut short
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or not line.endswith("\n"):
            continue
        key = (record.get("kind"), record["step"])
        if record["step"] > step or key in seen or key == ("ranks", step):
            continue
        seen.add(key)
        kept.append(line)
    if saved is not None and ("checkpoint", step) not in seen:
        kept.append(_line("checkpoint", checkpoint_record(step, saved)))
    if kept == lines:
        return
    text = "".join(kept)
    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise write_error(path, err, len(text.encode()), f"rewriting {METRICS} for the resume") from None


class Reporter:
    """Progress bar, JSONL and TensorBoard on rank 0; silent elsewhere."""

    def __init__(self, output_dir: Path, rank: int, total_steps: int, start_step: int,
                 tensorboard: bool, stream=None, resumed: bool = False):
        self.rank, self.stream = rank, stream
        self.bar = self.jsonl = self.tb = None
        if rank != 0:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / METRICS
        self.jsonl = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run hides the events the run logged after its checkpoint, as metrics.jsonl
            # drops those records: they are logged again.
            self.tb = SummaryWriter(str(output_dir / "tensorboard"),
                                    purge_step=start_step + 1 if resumed else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                        dynamic_ncols=True, mininterval=1.0, file=stream)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def record(self, record: dict, kind: str = "train") -> None:
        if self.rank != 0:
            return
        line = _line(kind, record)
        try:
            self.jsonl.write(line)
            self.jsonl.flush()
        except OSError as err:
            raise write_error(self.path, err, len(line.encode()), "a metrics record") from None
        record = _finite({"kind": kind, **record})
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{kind}/{key}", value, record["step"])
        if kind == "train":
            self.bar.set_postfix(loss=_fmt(record["loss"], ".3f"), mlm_acc=_fmt(record["mlm_acc"], ".3f"),
                                 seq_s=_fmt(record["seq_per_s"], ".0f"))
        if kind != "ranks":  # the ranks' parameter checksums; a disagreement stops the run, saying so
            tqdm.write(json.dumps(_rounded(record)), file=self.stream)

    def close(self) -> None:
        """Idempotent."""
        for item in (self.bar, self.jsonl, self.tb):
            if item is not None:
                item.close()
        self.bar = self.jsonl = self.tb = None
        self.rank = -1  # nothing more is written


def _rounded(record: dict) -> dict:
    """For the terminal: 4 significant digits (metrics.jsonl keeps every digit)."""
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in record.items()}


def _fmt(value, spec: str) -> str:
    return "nan" if value is None else format(value, spec)
