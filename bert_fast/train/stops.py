"""Why and when a run stops: signals, non-finite losses, a collapsed fp16 loss scale.

Every rank must stop at the same step for the same reason, or the ranks that go on wait forever in
a collective of the next step. At the loop's checks one all-reduce (`dist.any_rank`) of [non-finite
loss, signal received], at the last micro batch of a step before `engine.step()`: a NaN on one
rank stops every rank with TrainingStopped, a signal on one rank makes every rank save and exit
normally.
"""

from __future__ import annotations

import signal

import torch


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss, collapsed loss scale); the message says why."""


class Signals:
    """SIGTERM/SIGINT set a flag; the loop stops at its next check (train.check_every). A second SIGINT
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

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class FiniteWatch:
    """The first step whose loss was not finite, kept on the device (0: none yet), so the loop
    reads it only at its checks (train.check_every, log, eval and checkpoint steps), not every step."""

    def __init__(self, device: torch.device):
        self.first = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.first = torch.where((self.first == 0) & ~torch.isfinite(loss), step, self.first)

    def read(self) -> int:
        return int(self.first)


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
