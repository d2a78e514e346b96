"""metrics.jsonl: one JSON line per log or eval event of a training run, appended as it runs
and cut back to the checkpoint a killed run resumes from."""

from __future__ import annotations

import json
import os
from pathlib import Path

from polygpt import faults
from polygpt.checkpoints import METRICS_FILE, failed_write
from polygpt.errors import PolygptError


def append(out: str | Path, record: dict) -> None:
    p = Path(out) / METRICS_FILE
    try:
        with open(p, "a") as f:
            start = f.tell()
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise PolygptError(failed_write(out, f"to {p}", e)) from None
    faults.point("metrics", p, start)


def read(out: str | Path) -> list[dict]:
    """The records of run directory `out`; a line cut short by a crash is skipped."""
    p = Path(out) / METRICS_FILE
    if not p.exists():
        return []
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise PolygptError(f"cannot read {p}: {e.strerror}") from None
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by a crash, or not ours
            if isinstance(row, dict):
                rows.append(row)
    return rows


def trim(out: str | Path, step: int) -> None:
    """Keep the records of steps up to `step` (the checkpoint a run resumes from): a killed
    run appended records past its last checkpoint, and maybe half a line, that the resumed run
    writes again."""
    p = Path(out) / METRICS_FILE
    if not p.exists():
        return
    keep = [r for r in read(out) if isinstance(r.get("step"), int) and r["step"] <= step]
    tmp = p.with_name(f".{METRICS_FILE}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, p)
