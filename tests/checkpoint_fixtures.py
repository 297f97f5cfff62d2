"""A checkpoint folder made without DeepSpeed, through the real commit step: for the tests of
validation, resume resolution, pruning and export."""

from __future__ import annotations

from pathlib import Path

import torch

from bert_fast.train import checkpoint
from bert_fast.train.checkpoint_manifest import FORMAT, PARTIAL
from bert_fast.train.rng import rng_state


def fake_checkpoint(root: Path, step: int, keep: int = 0, payload: bytes = b"x" * 1000) -> Path:
    """A world-size-1 checkpoint of `step` under `root` whose model-states file holds `payload`."""
    staging = root / PARTIAL / f"step_{step:08d}"
    staging.mkdir(parents=True)
    (staging / "mp_rank_00_model_states.pt").write_bytes(payload)
    torch.save(rng_state(), staging / "rng_rank00000.pt")
    meta = {"format": FORMAT, "step": step, "tag": staging.name, "world_size": 1, "zero_stage": 0,
            "client_state": {"step": step}}
    checkpoint._commit(root, staging, root / staging.name, meta, keep)
    return root / staging.name
