"""What a run reports: a progress bar on rank 0, and every log interval one JSONL record
(`<output_dir>/metrics.jsonl`) and TensorBoard scalars (`<output_dir>/tensorboard`).

Per-step values stay on the device as tensors and are summed there; they reach the host once
per log interval, so logging costs no synchronisation per step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

# Summed per micro batch on the device: losses weighted by their counts, so means are exact.
SUMS = ("loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "nsp_correct", "nsp_count",
        "tokens", "sequences", "flops")


class Window:
    """Running sums over one log interval, on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(SUMS), dtype=torch.float64, device=self.device)
        self.micro_steps = 0
        self.start = time.perf_counter()

    def add(self, out, batch: dict, flops: float) -> None:
        mlm_count = out.mlm_predictions.double()
        nsp_count = (batch["next_sentence_label"] != -100).sum().double()
        host = torch.tensor([float(batch["input_ids"].shape[0]), flops], dtype=torch.float64)
        values = torch.cat([torch.stack([
            out.loss.detach().double(), out.mlm_loss.detach().double(), out.nsp_loss.detach().double(),
            out.mlm_accuracy.detach().double() * mlm_count, mlm_count,
            out.nsp_accuracy.detach().double() * nsp_count, nsp_count,
            batch["attention_mask"].sum().double()]),
            host.to(self.device, non_blocking=True)])
        self.sums += values
        self.micro_steps += 1

    def summary(self, world_size: int) -> dict:
        """Means over every rank (an all-reduce) and rates over the wall time of the window."""
        sums = self.sums.clone()
        if dist.is_initialized() and world_size > 1:
            dist.all_reduce(sums)
        s = dict(zip(SUMS, sums.tolist()))
        seconds = time.perf_counter() - self.start
        n = max(1, self.micro_steps * world_size)
        return {"loss": s["loss"] / n, "mlm_loss": s["mlm_loss"] / n, "nsp_loss": s["nsp_loss"] / n,
                "mlm_acc": s["mlm_correct"] / max(1.0, s["mlm_count"]),
                "nsp_acc": s["nsp_correct"] / max(1.0, s["nsp_count"]),
                "seq_per_s": s["sequences"] / seconds, "tokens_per_s": s["tokens"] / seconds,
                "tflops": s["flops"] / seconds / 1e12}


class Reporter:
    """Progress bar, JSONL and TensorBoard on rank 0; silent elsewhere."""

    def __init__(self, output_dir: Path, rank: int, total_steps: int, start_step: int,
                 tensorboard: bool, stream=None):
        self.rank, self.stream = rank, stream
        self.bar = self.jsonl = self.tb = None
        if rank != 0:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (output_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                        dynamic_ncols=True, mininterval=1.0, file=stream)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def record(self, record: dict, kind: str = "train") -> None:
        if self.rank != 0:
            return
        record = {"kind": kind, **record}  # full precision: resumed runs are compared bit for bit
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{kind}/{key}", value, record["step"])
        if kind == "train":
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", mlm_acc=f"{record['mlm_acc']:.3f}",
                                 seq_s=f"{record['seq_per_s']:.0f}")
        tqdm.write(json.dumps(record), file=self.stream)

    def close(self) -> None:
        """Idempotent."""
        for item in (self.bar, self.jsonl, self.tb):
            if item is not None:
                item.close()
        self.bar = self.jsonl = self.tb = None
        self.rank = -1  # nothing more is written
