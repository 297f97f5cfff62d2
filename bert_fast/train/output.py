"""One run per output folder.

A run that does not resume refuses an output folder (or checkpoint folder) that holds an earlier
run's checkpoints, metrics or recipe, and names the ways out: `--resume auto` continues that run,
another `train.output_dir` starts elsewhere, and `--overwrite` moves the earlier run aside to
`<folder>.old-<time>`, deleting nothing. So metrics.jsonl and TensorBoard hold one run,
`checkpoint.keep` counts one run's checkpoints, and `latest` (the last save) is the newest step,
which `--resume auto` picks. Two runs in one folder had mixed their metrics, kept three
checkpoints under keep 2, and left `latest` at step 100 while `--resume auto` took step 800.

`claim` is collective: rank 0 looks and moves, and the other ranks learn its outcome from its
broadcast, which they wait for before they read anything in those folders.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bert_fast.train import dist
from bert_fast.train.checkpoint_manifest import PARTIAL, checkpoints

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
RECIPE = "config.yaml"  # the resolved recipe, written at the start of a run


def earlier_run(output: Path, root: Path) -> list[Path]:
    """What a run left in the output folder and the checkpoint folder `root`: checkpoints,
    unfinished saves, `latest`, metrics, TensorBoard events and the recipe."""
    found = [path for _, path in checkpoints(root)]
    found += [p for p in (root / "latest", output / METRICS, output / RECIPE) if p.exists()]
    found += [p for p in (root / PARTIAL, output / TENSORBOARD) if p.is_dir() and any(p.iterdir())]
    return found


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _aside(folder: Path, stamp: str) -> Path:
    target, n = folder.with_name(f"{folder.name}.old-{stamp}"), 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.old-{stamp}-{n}"), n + 1
    os.rename(folder, target)
    return target


def _refusal(output: Path, root: Path, found: list[Path]) -> str:
    def name(p: Path) -> str:
        return str(p.relative_to(output)) if _inside(p, output) else str(p)

    listed = ", ".join(name(p) for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    where = str(output) if all(_inside(p, output) for p in found) else f"{output} (checkpoints: {root})"
    return (f"train.output_dir={where} holds an earlier run ({listed}). Continue it with --resume auto, "
            "start this run elsewhere with train.output_dir=<another folder>, or pass --overwrite to move "
            f"the earlier run aside to {output}.old-<time> (nothing is deleted)")


def _claim(output: Path, root: Path, overwrite: bool, keep_out: dict[str, str]) -> list[tuple[Path, Path]]:
    """Rank 0: raises ValueError for a folder holding an earlier run, unless `overwrite`; then
    moves it aside and returns the (folder, where it went) pairs."""
    found = earlier_run(output, root)
    if not found:
        return []
    if not overwrite:
        raise ValueError(_refusal(output, root, found))
    folders: list[Path] = []  # the outermost folders holding what was found: one rename each
    for folder in (output, root):
        if any(_inside(p, folder) for p in found) and not any(_inside(folder, f) for f in folders):
            folders = [f for f in folders if not _inside(f, folder)] + [folder]
    for folder in folders:
        if _inside(Path.cwd(), folder):
            raise ValueError(f"--overwrite would move {folder}, which holds the working directory; "
                             "choose another train.output_dir")
        for setting, path in keep_out.items():
            if path and _inside(Path(path), folder):
                raise ValueError(f"--overwrite would move {folder}, which holds {setting}={path}; "
                                 "choose another train.output_dir")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [(folder, _aside(folder, stamp)) for folder in folders]


def claim(output: Path, root: Path, resume: str | None, overwrite: bool,
          keep_out: dict[str, str] | None = None) -> list[tuple[Path, Path]]:
    """Collective. Makes `output` (and the checkpoint folder `root`) this run's: a resumed run
    continues what is there; any other run refuses an earlier run's folder, or with `overwrite`
    moves it aside (see the module docstring). keep_out: settings naming paths the run still
    reads (checkpoint.init_from), which --overwrite must not move. Returns the moves made."""
    if resume and overwrite:
        raise ValueError("--overwrite starts a new run and --resume continues one: choose one")
    moves, error = [], None
    if dist.rank() == 0 and not resume:
        try:
            moves = _claim(Path(output), Path(root), overwrite, keep_out or {})
        except (ValueError, OSError) as err:
            error = str(err)
    moves, error = dist.from_rank0((moves, error))
    if error is not None:
        raise ValueError(error)
    return moves
