"""One writer per run directory, and a clean start after a crash.

`run_lock(out)` takes an exclusive `flock` on `.<name>.lock` beside the directory (not inside:
every checkpoint replaces the directory, and a lock on a file in a replaced directory locks
nothing). The kernel drops the lock when its process dies, however it dies, so a `kill -9`
never leaves a stale lock: the file stays, but the next run takes it over. The file holds the
holder's pid for the error message.

`owned` wraps the training loop: lock, remove what a killed writer left (checkpoints.clean_stale),
and on --resume drop the metrics the killed run wrote past its last checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from polygpt import checkpoints, metrics_log
from polygpt.errors import PolygptError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, runs are not locked
    fcntl = None


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    out = Path(out)
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise PolygptError(
                    f"another run (pid {pid}) is writing to {out}: wait for it to finish, "
                    "stop it, or train into another --out"
                ) from None
            try:  # the previous holder may have removed the file between our open and flock
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        raise PolygptError(f"cannot lock {path}: {e.strerror}") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a waiter then sees a new inode
        os.close(fd)


@contextmanager
def owned(out: str | Path, resume: bool) -> Iterator[None]:
    """Hold the lock of `out` after cleaning what a killed run left there (and, on resume,
    the metrics it wrote past its last checkpoint). Rank 0 alone does this under a launcher."""
    out = Path(out)
    with run_lock(out):
        checkpoints.clean_stale(out)
        if resume:
            try:
                step = checkpoints.read(out).step
            except PolygptError:
                step = None  # train() itself says what is wrong with the checkpoint
            if step is not None:
                metrics_log.trim(out, step)
        yield
