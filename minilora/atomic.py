"""Atomic writes: a folder appears complete or not at all.

Every checkpoint, adapter and merged model is written under a temporary name
beside its destination and renamed into place when complete. `os.replace` is
atomic on POSIX within one filesystem, so a crash, a full disk or a SIGKILL
mid-write leaves the previous version intact.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True):
    """Write a folder under a temporary name beside `final`, and rename it into place only when complete.

    A crash (even SIGKILL) leaves either the old folder or the new one, never a half-written one;
    at worst a `.tmp-*` folder is left beside it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite to replace it.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result should read like any folder
    try:
        yield tmp
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
