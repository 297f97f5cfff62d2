"""Atomic writes: the target is either the old file or the complete new one. The exclusive lock:
one process at a time, released when its holder dies."""

import fcntl
import os
from pathlib import Path

import pytest

from bert_fast.fileio import atomic_path, atomic_write_text, exclusive


def test_replaces_completely(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_a_plain_write_gives(tmp_path, umask):
    # mkstemp makes private files (0600): a manifest, config.yaml or checkpoint should be as
    # readable as any file the user writes, under whatever umask they run with.
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("atomic.txt", "plain.txt")}
    assert modes["atomic.txt"] == modes["plain.txt"] == 0o666 & ~umask, modes


def test_failure_keeps_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def _hold_lock_and_fork(lock, forked_pid_file):
    import multiprocessing
    import time

    with exclusive(lock):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()  # as prepare's fork-started tokenizer pool does
        Path(forked_pid_file).write_text(str(child.pid))
        time.sleep(60)  # killed here, holding the lock


def test_exclusive_lock_dies_with_its_process_not_with_forked_children(tmp_path):
    import multiprocessing
    import signal
    import time

    lock, pid_file = tmp_path / ".lock", tmp_path / "child.pid"
    holder = multiprocessing.get_context("spawn").Process(target=_hold_lock_and_fork, args=(lock, pid_file))
    holder.start()
    while not pid_file.exists():
        time.sleep(0.05)
    fd = os.open(lock, os.O_RDWR)
    try:
        with pytest.raises(OSError):  # held by the other process
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.kill()
        holder.join()
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free, although its forked child lives on
    finally:
        os.close(fd)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_exclusive_on_a_folder_it_cannot_write_reads_unlocked(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)  # as for a read-only shared dataset (root ignores modes)
    with exclusive(tmp_path / ".lock"):
        entered = True
    assert entered and not (tmp_path / ".lock").exists()
