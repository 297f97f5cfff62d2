"""Learning-rate schedule: linear warmup, then polynomial decay (NVIDIA's BERT recipe uses power
0.5, `PolyWarmUpScheduler`), linear decay (power 1) or a constant rate, never below
`min_lr_ratio` x the peak. Phase 2 starts a fresh schedule from step 0."""

from __future__ import annotations

import torch


def lr_factor(step: int, total: int, warmup: int, decay: str = "poly", power: float = 1.0,
              min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    if decay not in ("poly", "linear"):
        raise ValueError(f"schedule.decay must be poly, linear or constant, got {decay!r}")
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    factor = (1.0 - progress) ** (1.0 if decay == "linear" else power)
    return min_ratio + (1.0 - min_ratio) * factor


def scheduler(optimizer: torch.optim.Optimizer, recipe) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule (bert_fast/train/recipe.py Recipe) over `optimizer`'s learning rate."""
    from bert_fast.train.config import warmup_steps

    s, total = recipe.schedule, recipe.train.steps
    warmup = warmup_steps(recipe)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, s.decay, s.power, s.min_lr_ratio))
