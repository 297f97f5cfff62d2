"""What a killed run leaves behind, removed when the next run in its folder starts.

A SIGKILL (or a power cut) runs no cleanup: it can leave a save's staging folder
(`checkpoints/.partial/<tag>`), the temporary file of an atomic write (`.latest.XXXX.tmp`,
`.metrics.jsonl.XXXX.tmp`, `.config.yaml.XXXX.tmp`), a checkpoint folder that pruning had begun to
delete (its manifest goes first, so it reads as invalid), and an export's temporary folder beside
`export.hf_dir`. None of them is ever read as data; they only take space and confuse a reader.
Each run owns its folders (bert_fast/train/output.py), so anything of these names there is left
by an earlier process of this run. Rank 0 removes them once the folders are claimed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bert_fast.train.checkpoint_manifest import MANIFEST, PARTIAL, checkpoints
from bert_fast.train.output import METRICS, RECIPE


def _temporaries(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """atomic_path's temporary files for `names` in `folder` (`.<name>.XXXX.tmp`)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.endswith(".tmp") and p.name.startswith(
        tuple(f".{name}." for name in names))]


def find(output: Path, root: Path, hf_dir: str = "") -> list[Path]:
    """Leftovers of killed runs in the output folder, the checkpoint folder `root` and beside
    export.hf_dir (`hf_dir`, '' for none)."""
    found = [root / PARTIAL] if (root / PARTIAL).exists() else []
    found += _temporaries(root, ("latest",))
    found += [path for _, path in checkpoints(root) if not (path / MANIFEST).exists()]
    found += _temporaries(output, (METRICS, RECIPE))
    if hf_dir:
        export = Path(hf_dir)
        found += [p for p in _temporaries(export.parent, (export.name,)) if p.is_dir()]
        if export.parent.is_dir():  # export.py moves the previous export to <temporary name>.old
            found += [p for p in export.parent.glob(f".{export.name}.*.tmp.old") if p.is_dir()]
    return sorted(set(found))


def remove(output: Path, root: Path, hf_dir: str = "") -> list[Path]:
    """Removes what `find` lists; returns it."""
    found = find(output, root, hf_dir)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found
