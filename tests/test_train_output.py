"""One run per output folder (bert_fast/train/output.py): a run that does not resume refuses a
folder holding an earlier run, naming the ways out, and `--overwrite` moves that run aside whole;
a rollback to an older checkpoint beside later ones is refused. World of one, no DeepSpeed; the
same decision on 2 ranks is checked in test_checkpoint_ranks.py's launch, end to end in
test_pretrain_output.py."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from bert_fast.train import checkpoint, checkpoint_manifest
from bert_fast.train.checkpoint_manifest import CheckpointError
from bert_fast.train.output import claim, earlier_run
from bert_fast.train.preflight import find_start


def _run(output, root=None, steps=(4,)):
    """An earlier run's files: metrics, its recipe, checkpoints made by the real commit step."""
    root = root or output / "checkpoints"
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.jsonl").write_text('{"kind": "train", "step": 4}\n')
    (output / "config.yaml").write_text("train:\n  steps: 4\n")
    for step in steps:
        staging = root / checkpoint_manifest.PARTIAL / f"step_{step:08d}"
        staging.mkdir(parents=True)
        torch.save({"step": step}, staging / "rng_rank00000.pt")
        meta = {"format": checkpoint_manifest.FORMAT, "step": step, "tag": staging.name, "world_size": 1,
                "zero_stage": 0, "client_state": {"step": step}}
        checkpoint._commit(root, staging, root / staging.name, meta, keep=0)
    return root


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_everything_an_earlier_run_leaves_is_found(tmp_path):
    output = tmp_path / "run"
    _run(output, steps=(2, 4))
    (output / "tensorboard").mkdir()
    (output / "tensorboard" / "events.out.tfevents.1").write_text("x")
    found = {p.relative_to(output).as_posix() for p in earlier_run(output, output / "checkpoints")}
    assert found == {"metrics.jsonl", "config.yaml", "tensorboard", "checkpoints/latest",
                     "checkpoints/step_00000002", "checkpoints/step_00000004"}
    (output / "checkpoints" / checkpoint_manifest.PARTIAL / "step_00000006").mkdir(parents=True)  # a save that crashed
    assert output / "checkpoints" / checkpoint_manifest.PARTIAL in earlier_run(output, output / "checkpoints")


def test_a_new_folder_or_one_without_a_run_is_taken(tmp_path):
    assert claim(tmp_path / "new", tmp_path / "new" / "checkpoints", None, False) == []
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("mine")
    (tmp_path / "notes" / "tensorboard").mkdir()  # empty: nothing was logged
    assert claim(tmp_path / "notes", tmp_path / "notes" / "checkpoints", None, False) == []
    assert (tmp_path / "notes" / "README").read_text() == "mine"


@pytest.mark.parametrize("leftover, shown", [
    ("metrics.jsonl", "metrics.jsonl"), ("config.yaml", "config.yaml"), ("checkpoints/latest", "checkpoints/latest"),
    ("checkpoints/step_00000004/bert_fast.json", "checkpoints/step_00000004"),
    ("checkpoints/.partial/step_00000004/rng_rank00000.pt", "checkpoints/.partial"),
    ("tensorboard/events.out.tfevents.1", "tensorboard")])
def test_an_earlier_run_is_refused_with_the_ways_out(tmp_path, leftover, shown):
    only = tmp_path / "only"  # any one of them is enough
    target = only / leftover
    target.parent.mkdir(parents=True)
    target.write_text("x")
    before = _tree(only)
    with pytest.raises(ValueError) as err:
        claim(only, only / "checkpoints", None, False)
    message = str(err.value)
    assert f"train.output_dir={only} holds an earlier run ({shown})" in message
    for way_out in ("--resume auto", "train.output_dir=<another folder>", "--overwrite", f"{only}.old-<time>"):
        assert way_out in message, message
    assert _tree(only) == before  # refused: nothing moved, nothing written


def test_overwrite_moves_the_earlier_run_aside_whole(tmp_path):
    output = tmp_path / "run"
    _run(output, steps=(2, 4))
    before = _tree(output)
    moves = claim(output, output / "checkpoints", None, True)
    assert len(moves) == 1 and moves[0][0] == output
    aside = moves[0][1]
    assert re.fullmatch(r"run\.old-\d{8}-\d{6}", aside.name) and aside.parent == tmp_path
    assert not output.exists() and _tree(aside) == before  # nothing deleted, nothing changed
    _run(output)
    again = claim(output, output / "checkpoints", None, True)[0][1]  # within the same second
    assert again != aside and again.exists() and aside.exists()


def test_a_separate_checkpoint_folder_is_checked_and_moved_too(tmp_path):
    output, root = tmp_path / "run", tmp_path / "shared" / "ckpt"
    _run(tmp_path / "elsewhere", root)  # checkpoints of an earlier run; this output folder is new
    with pytest.raises(ValueError, match=rf"{output} \(checkpoints: {root}\) holds an earlier run"):
        claim(output, root, None, False)
    moves = claim(output, root, None, True)
    assert [folder for folder, _ in moves] == [root] and not root.exists()
    assert checkpoint_manifest.checkpoints(moves[0][1])


@pytest.mark.parametrize("checkpoint_dir", ["run", "run/checkpoints", "run/deeper/ckpt", "."])
def test_overwrite_renames_each_folder_once(tmp_path, checkpoint_dir):
    """checkpoint.dir inside train.output_dir, the same folder, or the one holding it."""
    output = tmp_path / "runs" / "run"
    root = tmp_path / "runs" / checkpoint_dir
    _run(output, root)
    moves = claim(output, root, None, True)
    assert len(moves) == 1 and moves[0][0] == (tmp_path / "runs" if checkpoint_dir == "." else output)
    assert checkpoint_manifest.checkpoints(moves[0][1] / root.relative_to(moves[0][0]))


def test_resume_continues_and_overwrite_keeps_what_the_run_still_reads(tmp_path, monkeypatch):
    output = tmp_path / "run"
    _run(output)
    assert claim(output, output / "checkpoints", "auto", False) == []
    with pytest.raises(ValueError, match="--overwrite starts a new run and --resume continues one"):
        claim(output, output / "checkpoints", "auto", True)
    init_from = str(output / "checkpoints")
    with pytest.raises(ValueError, match=f"would move {output}, which holds checkpoint.init_from={init_from}"):
        claim(output, output / "checkpoints", None, True, {"checkpoint.init_from": init_from})
    monkeypatch.chdir(output)
    with pytest.raises(ValueError, match=f"would move {output}, which holds the working directory"):
        claim(output, output / "checkpoints", None, True)
    assert (output / "metrics.jsonl").exists()


def test_resuming_an_older_checkpoint_beside_later_ones_is_refused(tmp_path):
    root = _run(tmp_path / "run", steps=(2, 4, 6))
    (root / "step_00000006" / checkpoint_manifest.MANIFEST).unlink()  # damaged: not a later history
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000006"):
        kind, path, meta = find_start(root, "auto", None)
    assert (kind, path.name, meta["step"]) == ("resume", "step_00000004", 4)
    assert find_start(root, str(root / "step_00000004"), None)[1] == root / "step_00000004"
    with pytest.raises(CheckpointError, match=rf"--resume {root}/step_00000002: {root} holds later checkpoints "
                                              r"\(step_00000004\).*--resume auto"):
        find_start(root, str(root / "step_00000002"), None)
    assert json.loads((root / "step_00000004" / checkpoint_manifest.MANIFEST).read_text())["step"] == 4
    assert os.listdir(root / "step_00000002")
