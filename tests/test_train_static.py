"""The training loop on static packed batches: no device read between its checks (the number of
syncs of a whole run does not grow with its steps, both backends, with accumulation), at most
`data.buckets` batch shapes, `train.compile` equal to eager, and the refusals of
`train.compile` / `train.cuda_graphs` where they cannot work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import early
import pytest
import torch

from bert_fast.data.packing import pack_full_length
from bert_fast.data.synthetic import SyntheticBatches
from bert_fast.train.compiled import check_compile
from bert_fast.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Runs train() in a fresh process under the sync counter of tests/helpers.py; prints the count.
COUNTED_RUN = """
import json, sys
sys.path.insert(0, {tests!r})
from helpers import count_launches_and_syncs
from bert_fast.train.config import load_config
from bert_fast.train.loop import train
config = load_config({config!r}, {overrides!r})
with count_launches_and_syncs() as counts:
    outcome = train(config)
print(json.dumps({{"syncs": counts["syncs"], "steps": outcome.records[-1]["step"]}}))
"""


def counted_run(tmp_path: Path, steps: int, *overrides: str) -> dict:
    overrides = [f"train.steps={steps}", f"train.output_dir={tmp_path / str(steps)}", "log.every=1000",
                 "eval.every=0", "checkpoint.every=0", "train.check_every=1000", "log.tensorboard=false",
                 "data.workers=0", "train.threads=1", *overrides]
    script = COUNTED_RUN.format(tests=str(TESTS), config=str(ROOT / "configs/tiny-cpu.yaml"),
                                overrides=overrides)
    result = early.run([sys.executable, "-c", script], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


COUNTED_STEPS = (2, 6)


@early.job
def counted_runs(folder, threads):
    """(short, long) counted runs of test_a_run_reads_the_device_only_at_its_checks; an early job
    (tests/early.py)."""
    common = ("model.backend=torch", "train.micro_batch=4", "train.global_batch=8", "data.seq_length=32",
              "model.preset=tiny")
    return early.each(threads, *(lambda n=n: counted_run(folder, n, *common) for n in COUNTED_STEPS))


@pytest.mark.slow
def test_a_run_reads_the_device_only_at_its_checks(counted_runs):
    """Two runs of 2 micro batches per optimizer step (DeepSpeed engine, AdamW, real corpus
    batches), one longer, checks only at the end: the same number of device reads, so a step makes
    none. The end itself reads (the last check, the log record, the grad norm, checkpoint,
    fingerprints). The loop is the same for both backends; that the fast backend's forward,
    backward and optimizer step read nothing is tests/test_packed_batch.py's (a run of it here,
    in the Triton interpreter, passed once and costs a minute of the suite)."""
    short, long = counted_runs
    assert (short["steps"], long["steps"]) == COUNTED_STEPS
    assert long["syncs"] == short["syncs"], (short, long)


def test_synthetic_batches_pack_at_full_length_with_fixed_mlm_slots():
    padded = SyntheticBatches(batch_size=6, seq_length=24, vocab_size=2000, seed=3, max_predictions=4).next()
    assert int((padded["mlm_labels"] != -100).sum(1).max()) <= 4
    packed = pack_full_length(padded, predictions=4)
    assert packed["cu_seqlens"].tolist() == list(range(0, 7 * 24, 24)) and packed["max_seqlen"] == 24
    assert packed["mlm_positions"].shape == packed["mlm_labels"].shape == (6 * 4,)
    # Every masked token is in a slot, at its flat position, with its label; unused slots are -100.
    chosen = (padded["mlm_labels"] != -100).flatten().nonzero().squeeze(1)
    used = packed["mlm_labels"] != -100
    assert sorted(packed["mlm_positions"][used].tolist()) == chosen.tolist()
    assert torch.equal(packed["mlm_labels"][used], padded["mlm_labels"].flatten()[packed["mlm_positions"][used]])
    assert (packed["tokens"], packed["sequences"]) == (6 * 24, 6)
    with pytest.raises(ValueError, match="more than its 3 MLM slots"):
        pack_full_length(SyntheticBatches(6, 24, 2000, seed=3).next(), predictions=3)


@early.job
def compiled_and_eager_losses(folder, threads) -> dict[bool, list[float]]:
    """The train losses of 3 steps with train.compile false and true (Inductor compiles for a
    while on a fresh machine); an early job (tests/early.py)."""

    def losses_of(compiled: bool) -> list[float]:
        out = folder / str(compiled)
        result = early.run(
            [sys.executable, "pretrain.py", "--config", "configs/tiny-cpu.yaml", f"train.output_dir={out}",
             "train.steps=3", "log.every=1", "eval.every=0", "checkpoint.every=0", "data.workers=0",
             "model.backend=torch", "data.seq_length=32", "train.micro_batch=8", "model.hidden_dropout_prob=0",
             "model.attention_probs_dropout_prob=0", "train.threads=1", f"train.compile={str(compiled).lower()}"],
            cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["kind"] == "train"]

    return dict(zip((False, True), early.each(threads, lambda: losses_of(False), lambda: losses_of(True))))


@pytest.mark.slow
def test_compiled_run_matches_eager(compiled_and_eager_losses):
    """train.compile (Inductor, fullgraph, one graph per shape) logs the eager run's losses."""
    losses = compiled_and_eager_losses
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, device, message", [
    (["train.cuda_graphs=true"], "cpu", "train.cuda_graphs needs a CUDA device"),
    (["train.compile=true", "zero.stage=3"], "cpu", "zero.stage=3 gathers parameters"),
    (["train.cuda_graphs=true", "zero.stage=2"], "cuda", "zero.stage=2 reduces gradients"),
    (["train.cuda_graphs=true", "precision.fp16=true"], "cuda", "precision.fp16's loss scaler"),
])
def test_compile_and_cuda_graphs_refuse_what_cannot_work(overrides, device, message):
    config = load_config(ROOT / "configs/tiny-cpu.yaml", overrides)
    with pytest.raises(ValueError, match=message):
        check_compile(config, torch.device(device))


def test_compile_refuses_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config = load_config(ROOT / "configs/tiny-cpu.yaml", ["train.compile=true", "model.backend=fast"])
    with pytest.raises(ValueError, match="interpreter"):
        check_compile(config, torch.device("cpu"))
    check_compile(load_config(ROOT / "configs/tiny-cpu.yaml"), torch.device("cpu"))  # off: nothing to refuse
