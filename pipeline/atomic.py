"""Atomic writes: a file or a directory appears complete under its final name, or not at all.

Files go to a temporary sibling, are fsynced and `os.replace`d over the target (atomic on POSIX).
Directories (Zarr stores) cannot be replaced atomically over a non-empty directory, so the old one is
first renamed to a backup sibling, the new one renamed into place, then the backup removed;
`recover_dir` undoes a crash between the two renames, so a reader always finds a complete store.
A long-running writer holds an flock on its temp dir (`hold`), so that a later run can tell the temp
dirs of writers that died (lock free: `remove_dead_temp_dirs`) from those still at work.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename tmp_path over `path`. Returns the final path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (colleagues can read it).
        os.chmod(tmp_path, 0o666 & ~_umask())
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path: str | Path, rows: list[dict], columns) -> Path:
    """rows (dicts) as CSV with the given columns (extra keys ignored), written atomically."""
    import csv

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def _backup_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.previous")


def temp_dir_for(path: str | Path) -> Path:
    """A fresh empty temporary directory beside `path` (same filesystem, so rename is cheap)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))


def hold(directory: str | Path) -> int:
    """An exclusive flock on `directory`, as an open fd: closing it, or the process dying, releases it."""
    fd = os.open(directory, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_dead_temp_dirs(path: str | Path, marker: str) -> None:
    """Remove the `temp_dir_for(path)` dirs that hold `marker` (a name inside, made once held) and
    whose flock is free: the run that made them died."""
    path = Path(path)
    for candidate in path.parent.glob(f".{path.name}.*.partial"):
        if not (candidate / marker).exists():  # another writer's, or not yet held
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(candidate, ignore_errors=True)
        except OSError:  # held: its run is still at work
            pass
        finally:
            os.close(fd)


def recover_dir(path: str | Path) -> None:
    """If a previous `replace_dir` died between its two renames, put the old directory back."""
    path = Path(path)
    backup = _backup_name(path)
    if backup.exists():
        if path.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(backup, path)


def replace_dir(tmp: str | Path, path: str | Path) -> Path:
    """Move the finished directory `tmp` to `path`, replacing whatever was there."""
    tmp, path = Path(tmp), Path(path)
    recover_dir(path)
    backup = _backup_name(path)
    if path.exists():
        os.replace(path, backup)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(backup, ignore_errors=True)
    return path
