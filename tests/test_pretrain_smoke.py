"""`pretrain.py` end to end on CPU: a short run on synthetic data learns (losses fall well
below their starting values) and command-line errors are reported, not raised."""

import subprocess
import sys
from pathlib import Path

import pytest

from bert_fast.data.synthetic import SyntheticBatches
from bert_fast.train.config import load_config
from bert_fast.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def test_short_run_learns():
    config = load_config(ROOT / "configs/tiny-cpu.yaml",
                         ["train.steps=60", "train.micro_batch=16", "data.seq_length=32",
                          "train.log_every=20", "train.warmup_steps=10"])
    records = train(config)
    assert [r["step"] for r in records] == [20, 40, 60]
    first, last = records[0], records[-1]
    # ln(30522) = 10.3 at the start; the synthetic tokens come from 128 ids (ln 128 = 4.85).
    assert first["mlm_loss"] > 8.0 and last["mlm_loss"] < 5.5, records
    assert all(r["seq_per_s"] > 0 for r in records)


def test_cli_reports_bad_override():
    result = subprocess.run([sys.executable, "pretrain.py", "--config", "configs/tiny-cpu.yaml",
                             "train.stpes=3"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown config key train.stpes" in result.stderr


def test_synthetic_batches_follow_bert_masking():
    data = SyntheticBatches(batch_size=256, seq_length=64, seed=1)
    batch = data.next()
    labels, ids = batch["mlm_labels"], batch["input_ids"]
    chosen = labels != -100
    rate = chosen.sum().item() / (ids.numel() - 3 * 256)  # [CLS] and two [SEP] never chosen
    assert rate == pytest.approx(0.15, abs=0.01)
    masked = (ids[chosen] == 103).float().mean().item()
    kept = (ids[chosen] == labels[chosen]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.03) and kept == pytest.approx(0.1, abs=0.03)
    assert batch["next_sentence_label"].float().mean().item() == pytest.approx(0.5, abs=0.1)
    # Same seed, same batches: runs are reproducible.
    again = SyntheticBatches(batch_size=256, seq_length=64, seed=1).next()
    assert all((again[k] == batch[k]).all() for k in batch)
