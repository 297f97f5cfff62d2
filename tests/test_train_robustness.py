"""Single-process `python pretrain.py` runs (a world of one, a few seconds each) for the loop's
failure paths: a signal to the whole process group, fp32 masters of a stage-0 bf16 checkpoint,
and a checkpoint of another model shape refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make install adds it)")

import early  # noqa: E402

from bert_fast.ops import extension  # noqa: E402
from bert_fast.train import checkpoint_load, checkpoint_manifest  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not extension.available("cpu"), reason="bert_fast._C is not built")]

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.micro_batch=8", "data.seq_length=32", "eval.every=0", "log.every=1", "train.threads=1",
         "log.tensorboard=false"]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "pretrain.py", "--config", "configs/tiny-cpu.yaml", f"train.output_dir={out}",
            *SMALL, *extra]


def _env() -> dict:
    return {**early.environ(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def test_sigterm_to_the_process_group_saves_and_exits_0(tmp_path):
    """scancel / Ctrl-C signal every process of the group, DataLoader workers included: the
    workers ignore it, the main process finishes the step, saves and exits 0."""
    proc = subprocess.Popen(_command(tmp_path, "data.workers=1", "train.steps=500"), cwd=ROOT, env=_env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(s >= 3 for s in _steps(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-3000:]
    assert "resume with --resume auto" in log, log[-3000:]
    saved = checkpoint_manifest.resolve_resume(tmp_path / "checkpoints", "auto")
    assert saved is not None and 3 <= checkpoint_manifest.read_metadata(saved)["step"] < 500


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return early.run(_command(out, "data.workers=0", *extra), cwd=ROOT, env=_env(), timeout=300)


@early.job
def bf16_runs(root, threads) -> tuple[Path, dict]:
    """3 steps of ZeRO stage 0 in bf16 (DeepSpeed's FP16_UnfusedOptimizer keeps fp32 masters), then
    the runs that start from its checkpoint: another model shape ("shape"), and one step at lr 0
    under ZeRO-2 and -3 in bf16 (2, 3). (its checkpoint, key -> (output folder, finished process)):
    an early job (tests/early.py), the later runs one after another there, at once in this
    module's turn."""
    out = root / "bf16_stage0"
    done = _run(out, "train.steps=3", "precision.bf16=true", "zero.stage=0")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = checkpoint_manifest.resolve_resume(out / "checkpoints", "auto")
    later = {"shape": ["train.steps=2", "model.num_hidden_layers=3"],
             **{stage: ["train.steps=1", "precision.bf16=true", f"zero.stage={stage}", "optimizer.lr=0"]
                for stage in (2, 3)}}
    done = early.each(threads, *(lambda key=key: _run(root / str(key), *later[key], f"checkpoint.init_from={saved}")
                                 for key in later))
    return saved, {key: (root / str(key), result) for key, result in zip(later, done)}


@pytest.fixture(scope="module")
def bf16_stage0(bf16_runs):
    return bf16_runs[0]


def test_stage0_bf16_weights_are_the_fp32_masters(bf16_stage0):
    import torch

    path = bf16_stage0
    state = checkpoint_load.model_state_dict(path)
    saved = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    names = checkpoint_manifest.read_metadata(path)["param_group_names"]
    masters = {n: t for group, tensors in zip(names, saved["optimizer"]["fp32_groups"]) for n, t in zip(group, tensors)}
    assert sorted(masters) == sorted(n for n, v in saved["module"].items() if v.is_floating_point())
    for name, master in masters.items():
        assert master.dtype == torch.float32 and torch.equal(state[name], master), name
    # Three AdamW steps leave values between bf16 grid points: not the 16-bit copy.
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values())


def test_init_from_another_model_shape_is_refused_by_field(bf16_stage0, bf16_runs):
    _, done = bf16_runs[1]["shape"]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "num_hidden_layers: checkpoint 2, this run 3" in done.stderr and str(bf16_stage0) in done.stderr, \
        done.stderr[-3000:]


@pytest.mark.parametrize("stage", [2, 3])
def test_init_from_keeps_fp32_masters_under_zero_bf16(bf16_stage0, bf16_runs, stage):
    """Phase 2 under ZeRO-2/3 in bf16 starts from the fp32 masters, not their bf16 rounding: one
    step at lr 0 (a no-op for AdamW) saves exactly the weights it was given."""
    import torch

    out, done = bf16_runs[1][stage]
    assert done.returncode == 0, done.stderr[-3000:]
    source = checkpoint_load.model_state_dict(bf16_stage0)
    got = checkpoint_load.model_state_dict(checkpoint_manifest.resolve_resume(out / "checkpoints", "auto"))
    assert sorted(got) == sorted(source)
    for name, value in source.items():
        assert torch.equal(got[name], value), name
