"""Write a directory under a temporary name and move it into place only when it is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
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
    """Yield an empty staging directory; on success it replaces `dst` (rename), on failure it is removed.

    A killed process leaves only the staging directory, which never looks like a finished `dst`.
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
    old = dst.parent / f".{dst.name}.replaced"
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(stage, dst)
    shutil.rmtree(old, ignore_errors=True)
