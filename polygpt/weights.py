"""Checkpoint directories: safetensors weights, JSON metadata, atomic writes.

    weights/<run>/
      config.json            spec, tokenizer description, run config, step, metrics, version
      model.safetensors      canonical names; the spec again in __metadata__ (JSON string)
      optimizer.safetensors  AdamW moments `exp_avg/<name>`, `exp_avg_sq/<name>`; step (training)
      tokenizer.json         the vocabulary
      metrics.jsonl          one JSON line per log/eval event (training)

Framework-neutral: the backends read and write the tensors themselves (safetensors.torch,
mx.load / mx.save_safetensors), this module handles the directory, the JSON files and header
validation. Headers are read without loading a tensor and without executing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from polygpt import __version__
from polygpt.errors import PolygptError
from polygpt.spec import ModelSpec

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
FLOAT_DTYPES = ("F32", "F16", "BF16")
# Files that belong to a run rather than to one snapshot; carried into every new snapshot.
_CARRIED = (METRICS_FILE,)


@dataclass
class Checkpoint:
    path: Path
    spec: ModelSpec
    tokenizer: dict
    config: dict = field(default_factory=dict)

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def optimizer_file(self) -> Path:
        return self.path / OPTIMIZER_FILE

    @property
    def step(self) -> int:
        return int(self.config.get("step", 0))

    @property
    def precision(self) -> str:
        return self.config.get("precision", "fp32")


def model_metadata(spec: ModelSpec, **extra: str) -> dict[str, str]:
    """safetensors metadata values must be strings, so the spec goes in as a JSON string."""
    return {"format": "polygpt", "polygpt_version": __version__, "spec": spec.to_json(), **extra}


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise PolygptError(f"{p} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolygptError(f"cannot read {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise PolygptError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise PolygptError(f"{p} must hold a JSON object")
    return d


def read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """(name -> (dtype, shape), metadata) of a safetensors file; catches truncation/corruption."""
    if not path.exists():
        raise PolygptError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {}
            for k in f.keys():
                sl = f.get_slice(k)
                tensors[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    except (SafetensorError, OSError, ValueError) as e:
        raise PolygptError(f"{path} is not a valid safetensors file ({e})") from None
    return tensors, meta


def check_model_file(path: Path, spec: ModelSpec) -> str:
    """Names, shapes and dtypes of a float checkpoint against the spec; returns its dtype."""
    tensors, _ = read_header(path)
    expected = spec.param_shapes()
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise PolygptError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise PolygptError(f"{path}: unexpected tensor {extra[0]!r} for this spec")
    dtypes = set()
    for name, shape in expected.items():
        dtype, got = tensors[name]
        if got != shape:
            raise PolygptError(f"{path}: {name} has shape {list(got)}, the spec says {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise PolygptError(f"{path}: {name} has dtype {dtype}, expected one of {FLOAT_DTYPES}")
        dtypes.add(dtype)
    if len(dtypes) > 1:
        raise PolygptError(f"{path}: mixed dtypes {sorted(dtypes)}")
    return dtypes.pop()


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint directory's JSON files (tensors are loaded by a backend)."""
    p = Path(path)
    if not p.is_dir():
        raise PolygptError(f"checkpoint directory {p} does not exist")
    cfg = _read_json(p / CONFIG_FILE)
    if "spec" not in cfg or not isinstance(cfg["spec"], dict):
        raise PolygptError(f"{p / CONFIG_FILE} has no 'spec' object")
    spec = ModelSpec.from_dict(cfg["spec"])
    tokenizer = _read_json(p / TOKENIZER_FILE)
    if not (p / MODEL_FILE).exists():
        raise PolygptError(f"{p / MODEL_FILE} is missing")
    return Checkpoint(path=p, spec=spec, tokenizer=tokenizer, config=cfg)


def write_checkpoint(
    out: str | Path,
    *,
    config: dict,
    tokenizer: dict,
    save_model: Callable[[Path], None],
    save_optimizer: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (see `atomic_directory`); run files
    (metrics.jsonl) are carried over from the directory being replaced."""
    with atomic_directory(out, carry=_CARRIED) as tmp:
        save_model(tmp / MODEL_FILE)
        if save_optimizer is not None:
            save_optimizer(tmp / OPTIMIZER_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer, ensure_ascii=False))
    return Path(out)


@contextmanager
def atomic_directory(out: str | Path, carry: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; on success it replaces `out`.

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
        if out.exists():
            old = out.parent / f".{out.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(d: Path) -> None:
    for f in d.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def recover(out: str | Path) -> None:
    """If a crash happened between the two renames of write_checkpoint, put the old one back."""
    out = Path(out)
    old = out.parent / f".{out.name}.old"
    if not out.exists() and old.exists():
        os.replace(old, out)


def append_metrics(out: str | Path, record: dict) -> None:
    with open(Path(out) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(out: str | Path) -> list[dict]:
    p = Path(out) / METRICS_FILE
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return rows


def dir_size(path: str | Path) -> dict[str, int]:
    p = Path(path)
    return {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}
