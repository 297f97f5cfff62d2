"""`python pretrain.py` as a new user meets it: a second run in the same folder is refused and
`--overwrite` moves the first aside; the done report names the output folder, last checkpoint
and export; the resolved recipe is printed by --print-config and saved in the output folder; and
a CPU run prints only our own lines (no accelerator warning, no DeepSpeed build notice)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import early
import pytest
from together import run_together

from bert_fast.train import checkpoint_manifest
from bert_fast.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/tiny-cpu.yaml"
SMALL = ["train.micro_batch=8", "data.seq_length=32", "data.workers=0", "train.threads=1", "eval.every=0",
         "log.every=1", "checkpoint.every=1", "checkpoint.keep=2"]
# Every line a CPU run prints, stdout and stderr (the progress bar redraws with \r).
OURS = re.compile(r"pretrain: |pretrain\.py: |\{\"kind\": |done: |  (output folder|last checkpoint|export): ")


def _pretrain(*args: str) -> subprocess.CompletedProcess:
    # As `make pretrain` runs on a machine without a GPU: no CUDA device, DS_ACCELERATOR unset.
    env = {k: v for k, v in early.environ().items() if k != "DS_ACCELERATOR"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    command = [sys.executable, "pretrain.py", "--config", RECIPE, *args]
    return early.run(command, cwd=ROOT, env=env, timeout=600)  # output captured as text


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_steps(out: Path) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == "train"]


@early.job
def one_run(folder, threads):
    """(output folder, finished process) of a 2-step run in a new folder: an early job
    (tests/early.py). The embedded corpus is prepared first: the run that trains its vocab also
    warns, once per machine, that the corpus gives fewer words than the recipe asks; the runs
    after it, measured here, print only ours."""
    # In a process of its own: the cache's lock (fcntl) is per process, so a thread here would not
    # keep this process's tests that prepare the same cache out.
    prepared = early.run([sys.executable, "-c", "from bert_fast.data.corpus import default_prepared; "
                          "default_prepared(8192)"], cwd=ROOT)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    out = folder / "run"
    done = _pretrain(f"train.output_dir={out}", *SMALL, "train.steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.mark.slow
def test_done_report_names_the_output_folder_checkpoint_and_export(one_run):
    out, done = one_run
    saved = out / "checkpoints" / "step_00000002"
    report = done.stdout[done.stdout.index("done: step 2, loss "):].splitlines()
    assert report[1:] == [f"  output folder:   {out} (metrics.jsonl, config.yaml, tensorboard)",
                          f"  last checkpoint: {saved}",
                          f"  export:          none (set export.hf_dir, or run: bert-fast export {saved} "
                          "<folder>)"], report
    assert checkpoint_manifest.resolve_resume(out / "checkpoints", "auto") == saved


@pytest.mark.slow
def test_a_cpu_run_prints_only_our_own_lines(one_run):
    """No accelerator warning (DeepSpeed is told it runs on the CPU), no DeepSpeed build notice:
    the progress bar, the records, the report."""
    _, done = one_run
    printed = [line.rstrip() for line in re.split(r"[\r\n]", done.stdout + done.stderr) if line.strip()]
    assert not [line for line in printed if not OURS.match(line)], printed


@pytest.mark.slow
def test_the_resolved_recipe_is_saved_in_the_output_folder(one_run):
    out, _ = one_run
    assert load_config(out / "config.yaml") == load_config(RECIPE, [f"train.output_dir={out}", *SMALL,
                                                                    "train.steps=2"])


@pytest.mark.slow
def test_two_runs_one_folder(one_run, tmp_path):
    first, _ = one_run
    out = tmp_path / "run"
    shutil.copytree(first, out)
    before = _tree(out)

    # The README's next command, into the same folder: refused, naming the folder and the ways out.
    second = _pretrain(f"train.output_dir={out}", *SMALL, "train.steps=3", "model.preset=mini")
    assert second.returncode == 2, second.stderr[-3000:]
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith(f"pretrain.py: error: train.output_dir={out} holds an earlier run ("), error
    for way_out in ("--resume auto", "train.output_dir=<another folder>", "--overwrite"):
        assert way_out in error, error
    assert _tree(out) == before  # nothing written, nothing moved

    third = _pretrain(f"train.output_dir={out}", *SMALL, "train.steps=3", "model.preset=mini", "--overwrite")
    assert third.returncode == 0, third.stderr[-3000:]
    aside = next(tmp_path.glob("run.old-*"))
    assert f"pretrain: moved the earlier run in {out} to {aside}" in third.stdout
    assert _tree(aside) == before  # the first run, whole
    assert _train_steps(out) == [1, 2, 3] and _train_steps(aside) == [1, 2]
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]  # keep 2
    assert (root / "latest").read_text() == checkpoint_manifest.resolve_resume(root, "auto").name == "step_00000003"
    assert load_config(out / "config.yaml").model.preset == "mini"


def test_print_config_prints_the_resolved_recipe_and_exits(tmp_path):
    done = _pretrain("--print-config", "train.steps=5", f"train.output_dir={tmp_path / 'never'}")
    assert done.returncode == 0 and not done.stderr, done.stderr
    (tmp_path / "printed.yaml").write_text(done.stdout)
    assert load_config(tmp_path / "printed.yaml") == load_config(
        RECIPE, ["train.steps=5", f"train.output_dir={tmp_path / 'never'}"])
    assert not (tmp_path / "never").exists()


def test_help_says_where_the_keys_are_and_bad_keys_get_suggestions():
    # Three starts that each end at the command line: at once (one core each, mostly imports).
    helped, typo, both = run_together(lambda: _pretrain("--help"), lambda: _pretrain("train.step=5"),
                                      lambda: _pretrain("--resume", "auto", "--overwrite"))
    assert helped.returncode == 0
    assert "--print-config" in helped.stdout and "bert_fast/train/recipe.py" in helped.stdout
    assert "--overwrite" in helped.stdout
    assert typo.returncode == 2
    assert "unknown config key train.step (did you mean train.steps?)" in typo.stderr, typo.stderr
    assert both.returncode == 2 and "choose one" in both.stderr
