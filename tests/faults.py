"""Runs pretrain.py with a fault at a chosen point: a SIGKILL, or a write that fails.

    python tests/faults.py SITE N [pretrain.py arguments ...]

The fault strikes the N-th time (counted from this process's start) the run reaches SITE:

- deepspeed-write: DeepSpeed's torch.save of a checkpoint file has written half its bytes
- rng-write:       our RNG file (its temporary name) has half its bytes
- hashing:         a background thread is hashing a block of a checkpoint file
- manifest:        the manifest's temporary file has half its text
- rename:          the checkpoint folder has just been renamed into place (before `latest`)
- latest:          `latest`'s temporary file has half its text
- prune:           pruning has deleted an old checkpoint's manifest, not yet its files
- record:          a checkpoint record is about to be written to metrics.jsonl
- line:            a train record is half written to metrics.jsonl
- step:            an optimizer step is done, before it is logged
- resume-rewrite:  the resumed run's rewrite of metrics.jsonl has half its text
- enospc:          DeepSpeed's torch.save of a checkpoint file writes half its bytes, then raises
                   OSError ENOSPC as a full disk does (no kill: the run must end by itself)
- enospc-rewrite:  the resumed run's rewrite of metrics.jsonl raises OSError ENOSPC
- error:           an optimizer step is done, then a RuntimeError nobody foresaw is raised

A kill is SIGKILL to this process, as the kernel's OOM killer or `kill -9` sends it: no Python
cleanup runs. Test helper for tests/test_faults.py; it patches the functions the run calls.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _Counter:
    def __init__(self, n: int):
        self.left = n

    def hit(self) -> bool:
        """True the n-th time it is called."""
        self.left -= 1
        return self.left == 0


def _name(target):
    """The file torch.save writes: a path, checksums.HashingWriter's `path`, a file's `name`."""
    return getattr(target, "path", getattr(target, "name", target))


def _in_staging(target) -> bool:
    name = _name(target)
    return isinstance(name, (str, os.PathLike)) and "/.partial/" in os.fspath(name)


def _deepspeed_file(f) -> bool:
    """DeepSpeed's checkpoint engine saves to a path, or (bert_fast.train.checkpoint hashing its
    writes) to a checksums.HashingWriter; our RNG file is a plain open file."""
    return isinstance(f, (str, os.PathLike)) or type(f).__name__ == "HashingWriter"


def install(site: str, n: int) -> None:
    import shutil

    import torch

    from bert_fast.train import checkpoint, checkpoint_manifest, metrics
    from bert_fast.train.metrics import Reporter

    count = _Counter(n)
    save, write_text, rmtree, rename = torch.save, checkpoint.atomic_write_text, shutil.rmtree, os.rename

    def half_then(fault):
        def torch_save(obj, f, *args, **kwargs):
            deepspeed_file = _deepspeed_file(f)
            wanted = {"deepspeed-write": deepspeed_file, "enospc": deepspeed_file, "rng-write": not deepspeed_file}
            if not (_in_staging(f) and wanted[site] and count.hit()):
                return save(obj, f, *args, **kwargs)
            data = io.BytesIO()
            save(obj, data, *args, **kwargs)
            half = data.getvalue()[:len(data.getvalue()) // 2]
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as out:
                    out.write(half)
            else:
                f.write(half)
                f.flush()
            fault(os.fspath(_name(f)))
        return torch_save

    def no_space(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    if site in ("deepspeed-write", "rng-write"):
        torch.save = half_then(lambda path: _kill())
    elif site == "enospc":
        torch.save = half_then(no_space)
    elif site == "hashing":
        try:
            from bert_fast.train import checksums
            module, name = checksums, "_block_sha256"
        except ImportError:  # before checkpoints were hashed in blocks: the one hash of the commit
            module, name = checkpoint, "sha256_file"
        hashed = getattr(module, name)

        def hashing(*args):
            if count.hit():
                _kill()
            return hashed(*args)
        setattr(module, name, hashing)
    elif site in ("manifest", "latest"):
        name = checkpoint_manifest.MANIFEST if site == "manifest" else "latest"

        def atomic_write_text(path, text):
            if Path(path).name == name and count.hit():
                with checkpoint.atomic_path(path) as tmp:
                    tmp.write_text(text[:len(text) // 2])
                    _kill()
            return write_text(path, text)
        checkpoint.atomic_write_text = atomic_write_text
    elif site == "rename":
        def os_rename(src, dst, *args, **kwargs):
            rename(src, dst, *args, **kwargs)
            if _in_staging(str(src)) and Path(dst).name.startswith("step_") and count.hit():
                _kill()
        os.rename = os_rename
    elif site == "prune":
        def prune(path, *args, **kwargs):
            path = Path(path)
            if path.name.startswith("step_") and not _in_staging(str(path)) and count.hit():
                _kill()
            return rmtree(path, *args, **kwargs)
        shutil.rmtree = prune
    elif site in ("record", "line"):
        record = Reporter.record

        def reporter_record(self, values, kind="train"):
            if site == "record" and kind == "checkpoint" and count.hit():
                _kill()
            if site == "line" and kind == "train" and count.hit():
                line = json.dumps({"kind": kind, **values}) + "\n"
                self.jsonl.write(line[:len(line) // 2])
                self.jsonl.flush()
                _kill()
            return record(self, values, kind)
        Reporter.record = reporter_record
    elif site in ("step", "error"):
        step = Reporter.step

        def reporter_step(self, k=1):
            if count.hit():
                if site == "error":
                    raise RuntimeError("injected by tests/faults.py")
                _kill()
            return step(self, k)
        Reporter.step = reporter_step
    elif site in ("resume-rewrite", "enospc-rewrite"):
        rewrite = metrics.atomic_write_text

        def metrics_rewrite(path, text):
            if count.hit():
                if site == "enospc-rewrite":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                with checkpoint.atomic_path(path) as tmp:
                    tmp.write_text(text[:len(text) // 2])
                    _kill()
            return rewrite(path, text)
        metrics.atomic_write_text = metrics_rewrite
    else:
        raise SystemExit(f"tests/faults.py: unknown site {site!r}")


def main() -> None:
    site, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    sys.path.insert(0, str(ROOT))
    import pretrain

    install(site, n)
    pretrain.end_process(pretrain.main(args))


if __name__ == "__main__":
    main()
