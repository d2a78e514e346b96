"""Crash injection for the reliability tests (tests/test_crash.py); inert unless asked for.

`POLYGPT_KILL_AT=<point>:<n>[:<fraction>]` makes the n-th time this process reaches `point`
its last. When the point names a file that was just written, the file is first cut back to
`fraction` of the bytes that write added (what the kernel leaves of a write interrupted
there); then the process sends itself SIGKILL, which no handler, `finally` or atexit hook
survives: the disk is left exactly as by `kill -9` at that moment. Points, in write order:

    metrics    after a line is appended to metrics.jsonl
    model      after model.safetensors is written into the temporary directory
    optimizer  after optimizer.safetensors is written there
    config     after config.json is written there
    swap       between the two renames that replace the checkpoint directory
    swapped    after both renames, before the old directory is removed

A deterministic point instead of a timer, so a test that kills at "the middle of the
optimizer file" always kills there.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "POLYGPT_KILL_AT"
_seen: dict[str, int] = {}


def point(name: str, path: Path | None = None, start: int = 0) -> None:
    """A place a test may kill the process; `path` was just written from byte `start` on."""
    want = os.environ.get(ENV)
    if not want:
        return
    target, n, *fraction = want.split(":")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != int(n):
        return
    if path is not None and fraction:
        size = os.path.getsize(path)
        os.truncate(path, start + int((size - start) * float(fraction[0])))
    os.kill(os.getpid(), signal.SIGKILL)
