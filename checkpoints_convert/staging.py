"""Write a directory under a temporary name and move it into place only when it is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def staging_path(dst: Path) -> Path:
    """The fixed temporary name next to `dst`: a rerun after an interruption finds and discards it."""
    return dst.parent / f".{dst.name}.incomplete"


def check_destination(dst: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty destination unless `overwrite`; raise before any work starts."""
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} is not empty; pass --overwrite (overwrite=True) to replace it")
    return dst


@contextlib.contextmanager
def staged_directory(dst: str | Path, overwrite: bool = False):
    """Yield an empty staging directory; on success it is synced to disk and replaces `dst` (rename), on failure
    it is removed. A killed process leaves only the staging directory, which never looks like a finished `dst`.
    """
    dst = check_destination(dst, overwrite)
    stage = staging_path(dst)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    sync_tree(stage)
    old = dst.parent / f".{dst.name}.replaced"
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(stage, dst)
    _fsync(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def sync_tree(directory: Path) -> None:
    """fsync every file and directory under `directory`: the one commit, at the end (the writers never sync), so
    that the renamed destination is on disk in full even after a power loss. From several threads, so that the
    journal commits their flushes together; the writers started each file's writeback as they closed it."""
    paths = [os.path.join(root, name) for root, _, files in os.walk(directory) for name in [*files, "."]]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(_fsync, paths))


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
