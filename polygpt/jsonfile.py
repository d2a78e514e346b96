"""JSON files: read with a one-line error for anything that is not a JSON object, written
atomically."""

from __future__ import annotations

import json
from pathlib import Path

from polygpt.atomic import atomic_file
from polygpt.errors import PolygptError


def read_json(p: Path) -> dict:
    """A JSON object from a file; anything else is a one-line PolygptError."""
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise PolygptError(f"{p} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolygptError(f"cannot read {p}: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit int, [[[[...
        raise PolygptError(f"{p} is not valid JSON: {str(e) or type(e).__name__}") from None
    if not isinstance(d, dict):
        raise PolygptError(f"{p} must hold a JSON object")
    return d


def write_json(path: str | Path, obj: object, indent: int | None = 2) -> None:
    """Write `obj` as JSON atomically (see atomic.atomic_file)."""
    with atomic_file(path) as tmp:
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
        tmp.write_text(text + ("\n" if indent else ""), encoding="utf-8")
