"""Checkpoint directories: what a run or a conversion saves, read back checked in one call.

    weights/<run>/
      config.json            spec, tokenizer description, run config, step, metrics, version
      model.safetensors      canonical names; the spec again in __metadata__ (JSON string)
      optimizer.safetensors  AdamW moments `exp_avg/<name>`, `exp_avg_sq/<name>`; step (training)
      tokenizer.json         the vocabulary
      metrics.jsonl          one JSON line per log/eval event (training; metrics_log.py)

Framework-neutral: the backends read and write the tensors themselves, this module handles the
directory and its JSON files, and checks the model file's header (modelfile.py) without
loading a tensor. A directory is replaced whole (atomic.atomic_directory).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError

from polygpt import atomic, faults, modelfile
from polygpt.errors import PolygptError, short_repr
from polygpt.jsonfile import read_json
from polygpt.modelfile import ModelFile
from polygpt.spec import ModelSpec

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
# Files that belong to a run rather than to one snapshot; carried into every new snapshot.
_CARRIED = (METRICS_FILE,)

# config.json fields other modules read, and the type each must have when present
_CONFIG_TYPES = {
    "step": int,
    "precision": str,
    "backend": str,
    "device": str,
    "metrics": dict,
    "run": dict,
    "train_state": dict,
}


@dataclass
class Checkpoint:
    """A checkpoint directory as `read` returns it: every file checked, no tensor loaded."""

    path: Path
    model: ModelFile  # what a backend's load_model takes
    tokenizer: dict
    config: dict = field(default_factory=dict)

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def model_file(self) -> Path:
        return self.model.path

    @property
    def optimizer_file(self) -> Path:
        return self.path / OPTIMIZER_FILE

    @property
    def step(self) -> int:
        return int(self.config.get("step") or 0)  # type checked by read


def read(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint directory: its JSON files, and its model file's tensor names,
    shapes and dtypes against the spec (tensors are loaded by a backend)."""
    p = Path(path)
    if not p.exists() and atomic.aside(p).is_dir():
        p = atomic.aside(p)  # a writer was killed between its two renames: this is it (recover)
    if not p.is_dir():
        raise PolygptError(f"checkpoint directory {p} does not exist")
    cfg = read_json(p / CONFIG_FILE)
    if "spec" not in cfg or not isinstance(cfg["spec"], dict):
        raise PolygptError(f"{p / CONFIG_FILE} has no 'spec' object")
    spec = ModelSpec.from_dict(cfg["spec"])
    _check_config_types(p / CONFIG_FILE, cfg)
    tokenizer = read_json(p / TOKENIZER_FILE)
    model = modelfile.check(p / MODEL_FILE, spec)
    return Checkpoint(path=p, model=model, tokenizer=tokenizer, config=cfg)


def _check_config_types(path: Path, cfg: dict) -> None:
    for key, typ in _CONFIG_TYPES.items():
        if key not in cfg:
            continue
        v = cfg[key]
        if not isinstance(v, typ) or isinstance(v, bool) or (typ is int and v < 0):
            what = "a non-negative integer" if typ is int else f"a JSON {typ.__name__}"
            raise PolygptError(f"{path}: {key!r} must be {what}, got {short_repr(v)}")


def write(
    out: str | Path,
    *,
    config: dict,
    tokenizer: dict,
    save_model: Callable[[Path], None],
    save_optimizer: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (see atomic.atomic_directory); run files
    (metrics.jsonl) are carried over from the directory being replaced.

    A failed write (disk full, no permission, a file size limit) is one PolygptError that
    says so and what `out` still holds: the previous checkpoint, untouched."""
    try:
        with atomic.atomic_directory(out, carry=_CARRIED) as tmp:
            save_model(tmp / MODEL_FILE)
            faults.point("model", tmp / MODEL_FILE)
            if save_optimizer is not None:
                save_optimizer(tmp / OPTIMIZER_FILE)
                faults.point("optimizer", tmp / OPTIMIZER_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
            faults.point("config", tmp / CONFIG_FILE)
            (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer, ensure_ascii=False))
    except (OSError, SafetensorError, RuntimeError) as e:
        # how the writers report a failed write: Python, safetensors, mlx respectively
        step = config.get("step")
        what = f"the step {step} checkpoint to {out}" if step is not None else f"{out}"
        raise PolygptError(failed_write(out, what, e)) from None
    return Path(out)


def failed_write(out: str | Path, what: str, e: BaseException) -> str:
    """The one-line message for a failed write into run directory `out`: why, and which
    checkpoint `out` still holds."""
    reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
    reason = reason.strip().splitlines()[0]
    try:
        prev = f"{out} still holds its step {read(out).step} checkpoint, unchanged"
    except PolygptError:
        prev = f"no checkpoint was saved in {out}"
    return f"could not write {what} ({reason}): {prev}"


def clean_stale(out: str | Path) -> list[Path]:
    """Remove what a killed writer of `out` left beside it: temporary directories, an old
    directory already replaced, and a metrics.jsonl that no checkpoint belongs to (a run killed
    before its first). Call it only while holding the run lock (rundir.run_lock): a live
    writer's temporary directory looks the same. Returns what was removed."""
    out = Path(out)
    atomic.recover(out)
    removed = atomic.stale_beside(out)
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    orphan = out / METRICS_FILE
    if orphan.exists() and not (out / CONFIG_FILE).exists():
        orphan.unlink()
        removed.append(orphan)
    return removed


def dir_size(path: str | Path) -> dict[str, int]:
    p = Path(path)
    return {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}
