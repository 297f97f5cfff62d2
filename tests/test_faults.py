"""Faults at any point of a run (tests/faults.py injects them into `python pretrain.py`):

- a chain of SIGKILLs at seeded random points (in DeepSpeed's checkpoint write, our RNG file, the
  background hashing, the manifest, the rename, `latest`, pruning, the metrics log, between steps,
  in a resume's own rewrite of the log), each followed by `--resume auto`, ends with the same
  bytes in its final checkpoint and the same metrics records as a run never interrupted, each
  record once, and nothing else in its folders;
- a checkpoint write that fails as a full disk does ends the run at once (exit 1, one line naming
  the folder and the space needed), DataLoader workers included;
- a byte flipped in a checkpoint file over 64 MiB is refused by --resume, init_from and export.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make install adds it)")

import early  # noqa: E402
from together import run_together  # noqa: E402

from bert_fast.ops import extension  # noqa: E402
from bert_fast.train import checkpoint_load, checkpoint_manifest  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_shm_op"),
              pytest.mark.skipif(not extension.available("cpu"), reason="bert_fast._C is not built")]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 32
RUN = ["train.micro_batch=8", "data.seq_length=32", "train.threads=1", "log.tensorboard=false", "log.every=1",
       "eval.every=8", "eval.batches=2", f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=2",
       "data.workers=1", "schedule.warmup_steps=4"]
# Where a kill can land (tests/faults.py). Each happens at every save or step, so the N-th (N <= 2)
# is always reached while steps remain: a kill advances the run by at most 4 of its 16 saves.
SITES = ("deepspeed-write", "rng-write", "hashing", "manifest", "rename", "latest", "prune", "record",
         "line", "step")
IN_A_WRITE = ("deepspeed-write", "rng-write", "hashing", "manifest")
KILLS = 6
SEED = int(os.environ.get("FAULT_CHAIN_SEED", "17"))
# Measured, not reproduced: they depend on the machine's speed at the time.
TIMINGS = {"seq_per_s", "tokens_per_s", "tflops", "tflops_per_gpu", "mfu_pct", "peak_memory_gb"}


def _env() -> dict:
    return {**early.environ(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(out: Path, *extra: str, fault: tuple[str, int] | None = None) -> subprocess.Popen:
    entry = ["tests/faults.py", fault[0], str(fault[1])] if fault else ["pretrain.py"]
    # early.popen: its own process group, killed if the session ends first (the chain is an early job).
    return early.popen([sys.executable, *entry, "--config", "configs/tiny-cpu.yaml",
                        f"train.output_dir={out}", *RUN, *extra], cwd=ROOT, env=_env(), text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    timeout = early.timeout(timeout)  # stretched in a job started early (niced)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _run(out: Path, *extra: str, fault=None, expect: int | None = 0) -> tuple[int, str, str]:
    code, stdout, stderr = _finish(_start(out, *extra, fault=fault))
    if expect is not None:
        assert code == expect, f"exit {code} ({fault}):\n{stdout[-2000:]}\n{stderr[-3000:]}"
    return code, stdout, stderr


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _comparable(record: dict) -> dict:
    """A record less its timings, with a checkpoint named by its folder (the runs' roots differ)."""
    kept = {k: v for k, v in record.items() if k not in TIMINGS}
    if "checkpoint" in kept:
        kept["checkpoint"] = Path(kept["checkpoint"]).name
    return kept


def _tree(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))


def _schedule(seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    sites = rng.sample(SITES, KILLS)
    if not set(sites) & set(IN_A_WRITE):
        sites[rng.randrange(KILLS)] = rng.choice(IN_A_WRITE)
    if "line" in sites:  # the next start must drop that half line: a kill in its rewrite too
        sites.insert(sites.index("line") + 1, "resume-rewrite")
    return [(site, 1 if site == "resume-rewrite" else rng.randint(1, 2)) for site in sites]


def _survivors(out: Path) -> list[str]:
    """Processes of the chain still alive (DataLoader workers of a killed run included)."""
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if f"train.output_dir={out}" in cmdline:
            alive.append(f"{proc.info['pid']}: {cmdline[:120]}")
    return alive


def _chain(out: Path, schedule: list[tuple[str, int]]) -> str:
    """The run killed at each fault of `schedule`, resumed after each; the last resume's stdout."""
    for i, fault in enumerate(schedule):
        code, _, stderr = _run(out, *(["--resume", "auto"] if i else []), fault=fault, expect=None)
        assert code == -signal.SIGKILL, f"kill {i} at {fault} did not happen (exit {code}):\n{stderr[-3000:]}"
    return _run(out, "--resume", "auto")[1]


CHAIN_TEST = "test_sigkill_chain_resumes_bit_exact_with_each_record_once_and_nothing_left"


@early.job
def chain_runs(root, threads):
    """The SIGKILL chain (one run after another on one core, the longest work here) and beside it
    its uninterrupted reference: (chain folder, reference folder, the chain's last stdout). Started
    with the session when other modules are selected (tests/early.py), else with this module (the
    `chain` fixture), so that the other tests take the second core meanwhile."""
    out, uninterrupted = root / "chain", root / "uninterrupted"
    stdout, _ = run_together(lambda: _chain(out, _schedule(SEED)), lambda: _run(uninterrupted))
    return out, uninterrupted, stdout


@pytest.fixture(scope="module", autouse=True)
def chain(request, tmp_path_factory):
    """Starts chain_runs with the module when the chain test is selected and the session has not
    started it yet; the chain test, last in the file, collects it."""
    here = [item.name for item in request.session.items if getattr(item, "module", None) is request.module]
    if CHAIN_TEST in here:
        early.begin("chain_runs", tmp_path_factory)


def _one_line(stderr: str) -> str:
    ours = [line for line in stderr.splitlines() if line.startswith("pretrain.py:")]
    assert len(ours) == 1, stderr[-3000:]
    return ours[0]


def _timed(out: Path, *extra: str, fault) -> tuple[int, float, str, subprocess.Popen]:
    started = time.monotonic()
    proc = _start(out, *extra, fault=fault)
    code, _, stderr = _finish(proc, timeout=90)
    return code, time.monotonic() - started, stderr, proc


def test_a_full_disk_ends_the_run_in_seconds_with_one_line_and_the_run_resumes(tmp_path):
    """DeepSpeed's torch.save of the second checkpoint writes half its bytes, then the disk is full
    (OSError ENOSPC, as tests/faults.py raises it). With 2 DataLoader workers (which ignore SIGTERM)
    the run hung for good at interpreter exit; now it exits 1 within seconds with one line naming
    the folder, the space the checkpoint needs (the first one's size) and the space free. A resume
    on the still-full disk fails as clearly (its rewrite of metrics.jsonl), then one with space
    finishes the run."""
    out, root = tmp_path / "full", tmp_path / "full" / "checkpoints"
    code, elapsed, stderr, proc = _timed(out, "data.workers=2", "train.steps=8", fault=("enospc", 2))
    assert code == 1 and elapsed < 30 and "Traceback" not in stderr, (code, elapsed, stderr[-3000:])
    line = _one_line(stderr)
    first = checkpoint_manifest.validate(root / "step_00000002")
    needed = sum(entry["size"] for entry in first["files"].values())
    assert f"no space left on device writing {root / '.partial' / 'step_00000004'}: checkpoint step_00000004 " \
           f"needs {needed / 1e6:.1f} MB ({needed:,} bytes, the size of step_00000002), its file system has " in line
    assert f"The last good checkpoint is {root / 'step_00000002'}" in line, line
    with pytest.raises(ProcessLookupError):  # no DataLoader worker outlived it
        os.killpg(proc.pid, 0)
    assert not (root / ".partial").exists()  # removed, freeing its space

    code, elapsed, stderr, _ = _timed(out, "data.workers=2", "train.steps=8", "--resume", "auto",
                                      fault=("enospc-rewrite", 1))
    assert code == 1 and elapsed < 30 and "Traceback" not in stderr, (code, elapsed, stderr[-3000:])
    assert f"no space left on device writing {out / 'metrics.jsonl'}: rewriting metrics.jsonl for the resume " \
           "needs " in _one_line(stderr), stderr[-3000:]

    _run(out, "data.workers=2", "train.steps=8", "--resume", "auto")
    assert [(r["kind"], r["step"]) for r in _records(out) if r["kind"] != "train"] == [
        ("checkpoint", 2), ("checkpoint", 4), ("checkpoint", 6), ("eval", 8), ("checkpoint", 8), ("ranks", 8)]


def test_an_unexpected_error_ends_the_run_in_seconds(tmp_path):
    """Any exception, not only the foreseen ones, ends the run at once, workers and all: its
    traceback, then one line naming it."""
    code, elapsed, stderr, proc = _timed(tmp_path / "bug", "data.workers=2", "train.steps=8", fault=("error", 3))
    assert code == 1 and elapsed < 30, (code, elapsed, stderr[-3000:])
    assert _one_line(stderr) == ("pretrain.py: error: RuntimeError: injected by tests/faults.py (unexpected: the "
                                 "traceback above shows where)")
    assert stderr.rstrip().endswith(_one_line(stderr)) and "Traceback" in stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


@early.job
def large_file_checkpoint(out, threads) -> Path:
    """One step of BERT-mini on synthetic ids (vocab 30522): its model-states file (weights and
    Adam's two moments, ZeRO stage 0, fp32) is about 130 MB, over the 64 MiB that main hashed. An
    early job (tests/early.py)."""
    _run(out, "data.source=synthetic", "model.preset=mini", "train.steps=1", "eval.every=0")
    return checkpoint_manifest.resolve_resume(out / "checkpoints", "auto")


def test_a_byte_flip_past_64_mib_is_refused_by_resume_init_from_and_export(large_file_checkpoint, tmp_path):
    path = large_file_checkpoint
    victim = path / "mp_rank_00_model_states.pt"
    size = victim.stat().st_size
    assert size > 64 << 20, size
    offset = 100 << 20  # in the second 64 MiB block
    with victim.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    where = f"mp_rank_00_model_states.pt bytes {64 << 20}-{min(size, 128 << 20) - 1}"
    with pytest.raises(checkpoint_manifest.CheckpointError, match=where):
        checkpoint_manifest.validate(path)

    # The three refusals read the checkpoint and write nothing: they run at once.
    resumed, phase2, done = run_together(
        lambda: _run(path.parent.parent, "data.source=synthetic", "model.preset=mini", "train.steps=2",
                     "--resume", str(path), expect=2),
        lambda: _run(tmp_path / "phase2", "data.source=synthetic", "model.preset=mini", "train.steps=1",
                     f"checkpoint.init_from={path}", expect=2),
        lambda: subprocess.run([sys.executable, "-m", "bert_fast.train.export", str(path), str(tmp_path / "hf")],
                               cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300))
    assert where in resumed[2] and "corrupted" in resumed[2], resumed[2][-2000:]
    assert where in phase2[2], phase2[2][-2000:]
    assert done.returncode == 2 and where in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "hf").exists()


# Last in the file: its runs started with the session or the module (chain_runs), beside other tests.
def test_sigkill_chain_resumes_bit_exact_with_each_record_once_and_nothing_left(chain_runs):
    out, uninterrupted, stdout = chain_runs
    schedule = _schedule(SEED)
    assert len([s for s in schedule if s[0] != "resume-rewrite"]) >= 5 and set(s for s, _ in schedule) & set(
        IN_A_WRITE)
    assert f"done: step {STEPS}" in stdout, stdout[-2000:]

    final = f"step_{STEPS:08d}"
    got = checkpoint_manifest.validate(out / "checkpoints" / final)
    expected = checkpoint_manifest.validate(uninterrupted / "checkpoints" / final)
    assert got["files"] == expected["files"], f"{schedule}: the final checkpoint's bytes differ"  # every byte
    weights, reference = (checkpoint_load.model_state_dict(p / "checkpoints" / final) for p in (out, uninterrupted))
    assert all(weights[k].equal(reference[k]) for k in reference) and weights.keys() == reference.keys()

    records, reference_records = _records(out), _records(uninterrupted)
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), f"{schedule}: a record twice: {sorted(k for k in keys if keys.count(k) > 1)}"
    assert keys == [(r["kind"], r["step"]) for r in reference_records], schedule  # none missing, in order
    assert [_comparable(r) for r in records] == [_comparable(r) for r in reference_records], schedule

    assert _tree(out) == _tree(uninterrupted), f"{schedule}: leftovers or missing files"
    for tree in (_tree(out), _tree(uninterrupted)):  # not even an empty staging folder
        assert not [p for p in tree if p.endswith(".tmp") or checkpoint_manifest.PARTIAL in p], tree
    assert (out / "checkpoints" / "latest").read_text() == final
    deadline = time.monotonic() + 15  # a killed run's DataLoader worker notices its parent is gone
    while _survivors(out) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _survivors(out), _survivors(out)
