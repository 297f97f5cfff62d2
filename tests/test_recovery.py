"""What a resumed run repairs before it goes on (no DeepSpeed, no process): the leftovers of a
killed run, the metrics log it left, and a full disk said in one line with the sizes."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from bert_fast.train import checkpoint, checkpoint_manifest, leftovers, metrics
from bert_fast.train.diskspace import DiskFullError, free_bytes, is_disk_full, write_error
from bert_fast.train.metrics import Reporter, repair_for_resume


def _checkpoint(root, step):
    """A valid checkpoint folder, made by the real commit step."""
    staging = root / checkpoint_manifest.PARTIAL / f"step_{step:08d}"
    staging.mkdir(parents=True)
    torch.save({"step": step}, staging / "rng_rank00000.pt")
    meta = {"format": checkpoint_manifest.FORMAT, "step": step, "tag": staging.name, "world_size": 1, "zero_stage": 0,
            "client_state": {"step": step}}
    checkpoint._commit(root, staging, root / staging.name, meta, keep=0)
    return root / staging.name


def test_a_killed_runs_leftovers_are_found_and_removed_and_nothing_else(tmp_path):
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    kept = [_checkpoint(root, 4), _checkpoint(root, 6), root / "latest"]
    half_pruned = _checkpoint(root, 2)
    (half_pruned / checkpoint_manifest.MANIFEST).unlink()  # pruning deletes the manifest first
    left = [root / checkpoint_manifest.PARTIAL / "step_00000008", root / ".latest.k2x9ab.tmp", half_pruned,
            out / ".metrics.jsonl.q1w2e3.tmp", out / ".config.yaml.z9y8x7.tmp",
            tmp_path / ".hf.1a2b.tmp", tmp_path / ".hf.1a2b.tmp.old"]
    (left[0]).mkdir(parents=True)
    (left[0] / "mp_rank_00_model_states.pt").write_bytes(b"half")
    for f in left[1:5]:
        f.touch()
    for d in left[5:]:
        d.mkdir()
        (d / "config.json").write_text("{}")
    mine = [out / "metrics.jsonl", out / "notes.tmp", out / ".hidden.tmp", tmp_path / "hf" / "config.json",
            tmp_path / ".other.1a2b.tmp"]  # not this run's temporaries: left alone
    for f in mine:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    expected = sorted([root / checkpoint_manifest.PARTIAL, *left[1:]])
    assert leftovers.find(out, root, str(tmp_path / "hf")) == expected
    assert leftovers.remove(out, root, str(tmp_path / "hf")) == expected
    assert not any(p.exists() for p in expected)
    assert all(p.exists() for p in kept + mine)
    assert checkpoint_manifest.resolve_resume(root, "auto") == kept[1]
    assert leftovers.find(out, root, str(tmp_path / "hf")) == []


def test_an_empty_staging_folder_goes_once_a_checkpoint_is_committed(tmp_path):
    _checkpoint(tmp_path, 2)
    assert not (tmp_path / checkpoint_manifest.PARTIAL).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]


def test_latest_is_pointed_at_the_checkpoint_resumed_from(tmp_path):
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    (tmp_path / "latest").write_text("step_00000002")  # a kill after the rename, before `latest`
    checkpoint.point_latest(tmp_path, newest)
    assert (tmp_path / "latest").read_text() == "step_00000004"


def _train(step):
    return "train", {"step": step, "loss": 10.0 - step, "mlm_acc": 0.1, "seq_per_s": 99.0}


def _lines(records):
    return "".join(metrics._line(kind, r) for kind, r in records)


def _log(tmp_path, records):
    reporter = Reporter(tmp_path, 0, 10, 0, tensorboard=False)
    for kind, record in records:
        reporter.record(record, kind=kind)
    reporter.close()


def test_resume_keeps_each_record_once_in_order_and_rebuilds_the_checkpoint_record(tmp_path):
    """What kills left on main: a record logged twice (a start over after a kill before the first
    checkpoint), records after the checkpoint, a line cut short, and a checkpoint whose record
    was never written (a kill between the folder's rename and its record)."""
    saved = tmp_path / "checkpoints" / "step_00000004"
    train = [_train(s) for s in range(1, 7)]
    _log(tmp_path, [train[0], train[1], ("checkpoint", metrics.checkpoint_record(2, tmp_path / "checkpoints" /
                                                                                 "step_00000002")),
                    train[0], train[2], train[3], ("eval", {"step": 4, "loss": 3.5}), train[4], train[5]])
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 7, "lo')
    repair_for_resume(tmp_path, 4, saved)
    expected = [train[0], train[1], ("checkpoint", {"step": 2, "checkpoint": str(tmp_path / "checkpoints" /
                                                                                 "step_00000002")}),
                train[2], train[3], ("eval", {"step": 4, "loss": 3.5}),
                ("checkpoint", {"step": 4, "checkpoint": str(saved)})]
    assert (tmp_path / "metrics.jsonl").read_text() == _lines(expected)
    # The rebuilt record is the one the run writes.
    _log(tmp_path / "direct", [("checkpoint", metrics.checkpoint_record(4, saved))])
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[-1] == (
        tmp_path / "direct" / "metrics.jsonl").read_text().strip()

    inode = (tmp_path / "metrics.jsonl").stat().st_ino
    repair_for_resume(tmp_path, 4, saved)  # nothing to repair: not rewritten
    assert (tmp_path / "metrics.jsonl").stat().st_ino == inode


def test_resume_at_the_last_step_drops_its_end_record_and_no_checkpoint_drops_all(tmp_path):
    saved = tmp_path / "step_00000002"
    _log(tmp_path, [_train(1), _train(2), ("checkpoint", metrics.checkpoint_record(2, saved)),
                    ("ranks", {"step": 2, "agree": True})])
    repair_for_resume(tmp_path, 2, saved)  # the end-of-run record is written again by the resumed run
    assert [(r["kind"], r["step"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] \
        == [("train", 1), ("train", 2), ("checkpoint", 2)]
    repair_for_resume(tmp_path, 0, None)  # killed before its first checkpoint: it starts over
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_full_disk_at_resume_names_the_file_and_the_sizes(tmp_path, monkeypatch):
    _log(tmp_path, [_train(1), _train(2)])

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics, "atomic_write_text", full)
    with pytest.raises(DiskFullError) as caught:
        repair_for_resume(tmp_path, 1, None)
    needed = len(metrics._line(*_train(1)))
    assert str(caught.value).startswith(
        f"no space left on device writing {tmp_path / 'metrics.jsonl'}: rewriting metrics.jsonl for the resume "
        f"needs {needed} bytes, its file system has ")
    assert "\n" not in str(caught.value) and caught.value.errno == errno.ENOSPC


def test_disk_full_is_recognised_through_the_errors_it_caused():
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 12 vs 7") from err
    except RuntimeError as err:
        assert is_disk_full(err)
    assert not is_disk_full(RuntimeError("unexpected pos 12 vs 7"))
    assert not is_disk_full(OSError(errno.EIO, "Input/output error"))
    other = write_error("/x/y", OSError(errno.EIO, "Input/output error"), 10, "a record")
    assert not isinstance(other, DiskFullError) and "writing /x/y failed" in str(other)
    assert free_bytes("/nonexistent/deeper/path") == free_bytes("/")
