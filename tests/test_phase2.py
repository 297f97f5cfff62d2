"""Phase 2 starts from a phase-1 checkpoint's weights (`checkpoint.init_from`) with a fresh
optimizer and schedule, at another sequence length, as in NVIDIA's two-phase BERT recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make install adds it)")

import early  # noqa: E402

from bert_fast.ops import extension  # noqa: E402
from bert_fast.train import checkpoint_load, checkpoint_manifest  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not extension.available("cpu"), reason="bert_fast._C is not built")]

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.micro_batch=8", "data.workers=0", "eval.every=0", "log.every=1", "train.threads=1"]


def _pretrain(out: Path, *overrides: str, expect_in_stdout: str = "") -> list[dict]:
    done = early.run([sys.executable, "pretrain.py", "--config", "configs/tiny-cpu.yaml",
                      f"train.output_dir={out}", *COMMON, *overrides], cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expect_in_stdout in done.stdout, done.stdout[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "train"]


@early.job
def phase_runs(root, threads) -> tuple[Path, dict]:
    """(phase 1's output folder, name -> (output folder, train records) of each PHASE2_RUNS run
    from phase 1's checkpoint): an early job (tests/early.py); the two phase 2 runs (one thread
    each) one after the other there, at once in this module's turn."""
    phase1 = root / "phase1"
    # Phase 1 also runs gradient accumulation: 2 micro batches of 8 per optimizer step.
    records = _pretrain(phase1, "train.steps=6", "data.seq_length=32", "schedule.warmup_steps=2",
                        "train.global_batch=16", expect_in_stdout="global batch 16 = 8 x 2 accumulation x 1")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["seq_per_s"] > 0 and all(r["grad_norm"] > 0 for r in records)
    outs = {name: root / name / "phase2" for name in PHASE2_RUNS}
    done = early.each(threads, *(lambda name=name: _pretrain(outs[name], *PHASE2_RUNS[name],
                                                             f"checkpoint.init_from={phase1 / 'checkpoints'}")
                                 for name in PHASE2_RUNS))
    return phase1, {name: (outs[name], records) for name, records in zip(PHASE2_RUNS, done)}


@pytest.fixture(scope="module")
def phase1(phase_runs):
    return phase_runs[0]


PHASE2_RUNS = {
    # lr 0: phase 2 must end exactly on phase 1's weights, which only holds if it started there.
    "lr0": ["train.steps=3", "data.seq_length=64", "schedule.warmup_steps=2", "optimizer.lr=0.0"],
    "warmup": ["train.steps=4", "data.seq_length=64", "schedule.warmup_steps=4", "optimizer.lr=0.001"],
}


@pytest.fixture(scope="module")
def phase2_runs(phase_runs) -> dict:
    return phase_runs[1]


def test_phase2_takes_phase1_weights(phase1, phase2_runs):
    phase2, records = phase2_runs["lr0"]
    assert [r["step"] for r in records] == [1, 2, 3]  # a fresh step count
    start = checkpoint_load.model_state_dict(checkpoint_manifest.resolve_resume(phase1 / "checkpoints", "auto"))
    end_path = checkpoint_manifest.resolve_resume(phase2 / "checkpoints", "auto")
    assert checkpoint_manifest.read_metadata(end_path)["step"] == 3
    end = checkpoint_load.model_state_dict(end_path)
    assert start.keys() == end.keys()
    for name in start:
        torch.testing.assert_close(end[name], start[name], rtol=0, atol=0, msg=name)


def test_phase2_schedule_restarts_warmup(phase2_runs):
    _, records = phase2_runs["warmup"]
    assert [r["lr"] for r in records] == pytest.approx([0.00025, 0.0005, 0.00075, 0.001])
