"""Writes that land whole or not at all: a file or a directory is filled beside its target and
renamed over it, so a reader, or a process started after a crash, sees the old one or the new
one, never half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from polygpt import faults


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is fsynced and renamed over
    `path` (readers see the old file or the new one, never half of one); on an exception it
    is removed and `path` is untouched."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(out: str | Path, carry: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; on success it replaces `out`, taking along
    the files named in `carry` that it does not hold itself.

    The old directory is moved aside and the new one renamed into place, so a crash at any
    point leaves a complete directory (the old one, or the new one; `recover` puts the old one
    back if the crash fell between the two renames) and never a half-written file. On an
    exception the temporary is removed and `out` is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for name in carry:
            if (out / name).exists() and not (tmp / name).exists():
                shutil.copy2(out / name, tmp / name)
        _fsync_dir(tmp)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover(out)  # a failure between the two renames: the old directory goes back
        raise


def _swap(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = aside(out)
    if old.exists():
        shutil.rmtree(old)
    os.replace(out, old)
    faults.point("swap")
    os.replace(tmp, out)
    faults.point("swapped")
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(d: Path) -> None:
    for f in d.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def aside(out: str | Path) -> Path:
    """Where atomic_directory moves the directory it replaces, until the new one is in place."""
    out = Path(out)
    return out.parent / f".{out.name}.old"


def recover(out: str | Path) -> None:
    """If a crash happened between atomic_directory's two renames, put the old one back."""
    out, old = Path(out), aside(out)
    if not out.exists() and old.exists():
        os.replace(old, out)


def stale_beside(out: str | Path) -> list[Path]:
    """What killed writers of `out` left beside it: temporary directories, and an old directory
    already replaced. Only while no writer runs: a live writer's temporary looks the same."""
    out, old = Path(out), aside(out)
    if not out.parent.is_dir():
        return []
    stale = list(out.parent.glob(f".{out.name}.tmp-*"))
    return stale + [old] if out.exists() and old.exists() else stale
