"""Atomic writes: a folder appears complete or not at all.

Every checkpoint, adapter and merged model is written under a temporary name
beside its destination and renamed into place when complete. `os.replace` is
atomic on POSIX within one filesystem, so a crash, a full disk or a SIGKILL
mid-write leaves the previous version intact.

Replacing an existing folder takes two renames (old aside, new in), since POSIX
has no atomic swap of directories; `clean_leftovers` repairs a kill between them.
Checkpoint folders are never replaced (each step has its own name), so this only
concerns `--overwrite` of an adapter or merged model.
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
    # mkdtemp makes the folder private, and safetensors (0.8) its files: the result should read like any file the
    # user makes (umask's modes), so that another user, or a server in a container, can load it
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                f.chmod(0o666 & ~umask)
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


def clean_leftovers(parent: str | os.PathLike) -> list[str]:
    """Tidy what a killed `atomic_dir` left in `parent`; returns one line per thing done.

    - `.NAME.tmp-*`: a save that never finished. Deleted; the previous NAME is intact.
    - `.NAME.old-PID`: the previous NAME, moved aside in the instant before the new one was renamed in.
      If NAME is missing (killed between the two renames), it is moved back; otherwise deleted.
    Call it only when no other process is writing into `parent`.
    """
    parent = Path(parent)
    done = []
    for p in sorted(parent.glob(".*.tmp-*")) if parent.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed the unfinished save {p}")
    for p in sorted(parent.glob(".*.old-*")) if parent.is_dir() else []:
        final = parent / p.name[1:].rsplit(".old-", 1)[0]
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed the replaced copy {p}")
        else:
            os.replace(p, final)
            done.append(f"restored {final} from {p} (a save was interrupted between its two renames)")
    return done
