"""Sweeps: train a list of runs, evaluate each on the full val split, sample, tabulate.

A sweep file (TOML) has a [sweep] table and [[run]] entries (name, config, optional backend and
key=value overrides). Each run trains into `<out>/<name>`; its result lands in `sweep.json` there
together with a fingerprint of the run's config, so re-running the sweep skips finished runs,
resumes an interrupted one from its last checkpoint, and retrains a run whose config changed.
The table of all results is written to `<results>/results.json` and `results.md`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from polygpt import __version__, atomic, checkpoints, config, evaluate, inference, jsonfile
from polygpt.errors import PolygptError
from polygpt.generate import GenerationConfig
from polygpt.train import TrainEvent, train

RESULT_FILE = "sweep.json"
# Config keys added since the first sweeps ran, with the default that means "as before".
ADDED_KEYS = {("train", "init_from"): "", ("train", "eval_dtype"): "auto"}


@dataclass
class RunSpec:
    name: str
    config: str
    backend: str = "torch"
    overrides: list[str] = field(default_factory=list)


@dataclass
class Sweep:
    name: str
    out: str
    results: str
    runs: list[RunSpec]
    sample_tokens: int = 300
    sample_temperature: float = config.SampleConfig.temperature
    seed: int = config.SampleConfig.seed
    eval_stride: int = 0  # 0: evaluate.py's default (block_size // 2)
    eval_max_tokens: int = 0  # 0: the whole val split
    device: str = "auto"


_SWEEP_KEYS = {
    "name",
    "out",
    "results",
    "sample_tokens",
    "sample_temperature",
    "seed",
    "eval_stride",
    "eval_max_tokens",
    "device",
}
_RUN_KEYS = {"name", "config", "backend", "overrides"}
# the type of every key a sweep file may set (int where a float is expected is fine)
_TYPES = {
    "name": str,
    "out": str,
    "results": str,
    "sample_tokens": int,
    "sample_temperature": (int, float),
    "seed": int,
    "eval_stride": int,
    "eval_max_tokens": int,
    "device": str,
    "config": str,
    "backend": str,
    "overrides": list,
}


def _check_types(p: Path, where: str, table: dict) -> None:
    for key, value in table.items():
        typ = _TYPES[key]
        ok = isinstance(value, typ) and not isinstance(value, bool)
        if key == "overrides":
            ok = ok and all(isinstance(o, str) for o in value)
        if not ok:
            raise PolygptError(f"{p}: {where}{key} has the wrong type ({value!r:.40})")


def load_sweep(path: str | Path) -> Sweep:
    p = Path(path)
    d = config.read_toml(p, "sweep file")
    head = d.get("sweep", {})
    if not isinstance(head, dict) or not isinstance(d.get("run", []), list):
        raise PolygptError(f"{p}: [sweep] must be a table and [[run]] an array of tables")
    unknown = sorted(set(head) - _SWEEP_KEYS) + sorted(set(d) - {"sweep", "run"})
    if unknown:
        raise PolygptError(f"{p}: unknown sweep key {unknown[0]!r}")
    _check_types(p, "sweep.", head)
    runs = []
    for i, r in enumerate(d.get("run", [])):
        if not isinstance(r, dict):
            raise PolygptError(f"{p}: run {i + 1} must be a [[run]] table")
        bad = sorted(set(r) - _RUN_KEYS)
        if bad:
            raise PolygptError(f"{p}: run {i + 1} has unknown key {bad[0]!r}")
        if "name" not in r or "config" not in r:
            raise PolygptError(f"{p}: run {i + 1} needs a name and a config")
        _check_types(p, f"run {i + 1} ", r)
        runs.append(RunSpec(**r))
    if not runs:
        raise PolygptError(f"{p}: no [[run]] entries")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise PolygptError(f"{p}: run names must be unique")
    return Sweep(
        name=head.get("name", p.stem),
        out=head.get("out", f"weights/{p.stem}"),
        results=head.get("results", f"weights/{p.stem}/results"),
        runs=runs,
        **{k: head[k] for k in _SWEEP_KEYS - {"name", "out", "results"} if k in head},
    )


def run_config(sweep: Sweep, run: RunSpec) -> config.RunConfig:
    cfg = config.load(run.config, run.overrides)
    cfg.train.out = str(Path(sweep.out) / run.name)
    cfg.train.backend = run.backend
    cfg.train.device = sweep.device
    if cfg.train.dtype == "auto":  # measurements to reproduce: the same numbers on any CPU
        cfg.train.dtype = "fp32"
    return cfg


def fingerprint(cfg: config.RunConfig) -> str:
    """Hash of everything that changes a run's numbers (not where it is written or logged)."""
    d = cfg.to_dict()
    for k in ("out", "log_interval", "save_checkpoints", "device"):
        d["train"].pop(k, None)
    d.pop("sample", None)
    # the hashes of runs trained before a key was added or removed stay what they were:
    # a removed key is hashed at the value it always had, an added key at its default (the
    # behaviour from before it existed) is left out
    for (section, key), value in config.REMOVED_KEYS.items():
        d[section][key] = value
    for (section, key), default in ADDED_KEYS.items():
        if d[section].get(key) == default:
            del d[section][key]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _finished(run_dir: Path, fp: str, max_iters: int) -> dict | None:
    p = run_dir / RESULT_FILE
    if not p.exists():
        return None
    try:
        res = json.loads(p.read_text())
        ck = checkpoints.read(run_dir)
    except (json.JSONDecodeError, OSError, PolygptError):
        return None
    if res.get("fingerprint") == fp and ck.step == max_iters:
        return res
    return None


def _resumable(run_dir: Path, fp: str) -> bool:
    try:
        ck = checkpoints.read(run_dir)
    except PolygptError:
        return False
    return ck.config.get("sweep_fingerprint") == fp and ck.optimizer_file.exists()


@dataclass
class RunSkipped:
    """A run whose result is already there (same fingerprint, all steps done)."""

    name: str


@dataclass
class RunStart:
    name: str
    resumed: bool
    backend: str
    out: Path


@dataclass
class RunDone:
    name: str
    result: dict


SweepEvent = RunSkipped | RunStart | RunDone | TrainEvent


def run_one(
    sweep: Sweep, run: RunSpec, on_event: Callable[[SweepEvent], None] = lambda ev: None
) -> dict:
    """Train (or resume, or skip) one run, evaluate it on the full val split, sample it."""
    cfg = run_config(sweep, run)
    run_dir = Path(cfg.train.out)
    fp = fingerprint(cfg)
    done = _finished(run_dir, fp, cfg.train.max_iters)
    if done is not None:
        on_event(RunSkipped(run.name))
        return done
    atomic.recover(run_dir)
    resume = _resumable(run_dir, fp)
    on_event(RunStart(run.name, resume, run.backend, run_dir))
    t0 = time.perf_counter()
    # the fingerprint travels in every checkpoint, so an interrupted run is recognised
    res = train(
        cfg,
        resume=resume,
        overwrite=not resume,
        extra_config={"sweep_fingerprint": fp},
        on_event=on_event,
    )
    train_wall = time.perf_counter() - t0
    # ms/iter means something only on an idle machine: keep the load it was measured under
    load_avg = [round(x, 2) for x in os.getloadavg()]
    ev, sample, spec = _evaluate_and_sample(sweep, run, cfg)
    result = _result(run, cfg, res, ev, spec)
    result.update(
        train_wall_s=train_wall,
        ms_per_iter=res.ms_per_iter,
        train_tokens_per_s=res.tokens_per_s,
        load_avg_1_5_15=load_avg,
        resumed=resume,
        sample=sample,
        fingerprint=fp,
        polygpt_version=__version__,
    )
    jsonfile.write_json(run_dir / RESULT_FILE, result)
    on_event(RunDone(run.name, result))
    return result


def _evaluate_and_sample(sweep: Sweep, run: RunSpec, cfg: config.RunConfig) -> tuple:
    """(evaluation on the full val split, saved beside the checkpoint; a sample of the
    sweep's length from the run's prompt; the model's spec) of a trained run."""
    run_dir = Path(cfg.train.out)
    ev = evaluate.evaluate_checkpoint(
        run_dir,
        backend=run.backend,
        device=sweep.device,
        stride=sweep.eval_stride or None,
        max_tokens=sweep.eval_max_tokens or None,
    )
    evaluate.save_result(run_dir, ev)
    lm = inference.load(run_dir, backend=run.backend, device=sweep.device)
    gen = GenerationConfig(
        max_new_tokens=sweep.sample_tokens, temperature=sweep.sample_temperature, seed=sweep.seed
    )
    return ev, lm.generate([cfg.sample.prompt], gen)[0], lm.spec


def _result(run: RunSpec, cfg: config.RunConfig, res, ev, spec) -> dict:
    """A run's row of the sweep: what it is, and its losses and perplexity."""
    return {
        "name": run.name,
        "backend": run.backend,
        "device": res.backend.get("device"),
        "blas": res.backend.get("blas"),
        "config": run.config,
        "overrides": run.overrides,
        "params_non_embedding": spec.num_params(),
        "params_total": spec.num_params(non_embedding=False),
        "n_layer": spec.n_layer,
        "n_embd": spec.n_embd,
        "max_iters": cfg.train.max_iters,
        "train_loss": res.train_loss,
        "val_loss": res.val_loss,
        "val_ppl": ev.perplexity,
        "val_ppl_low": ev.ppl_low,
        "val_ppl_high": ev.ppl_high,
        "val_bpc": ev.bits_per_char,
        "eval_stride": ev.stride,
        "eval_tokens": ev.tokens,
    }


def run_sweep(
    sweep: Sweep,
    *,
    only: list[str] | None = None,
    on_event: Callable[[SweepEvent], None] = lambda ev: None,
) -> list[dict]:
    runs = sweep.runs
    if only:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            raise PolygptError(f"no run named {unknown[0]!r} in the sweep")
        runs = [r for r in runs if r.name in only]
    results = [run_one(sweep, r, on_event) for r in runs]
    # the table covers every finished run of the sweep, not only the ones run this time
    table = []
    for r in sweep.runs:
        cfg = run_config(sweep, r)
        done = _finished(Path(cfg.train.out), fingerprint(cfg), cfg.train.max_iters)
        if done is not None:
            table.append(done)
    write_results(sweep, table)
    return results


def results_table(results: list[dict]) -> str:
    head = (
        "| run | backend | params (non-emb) | iters | train loss | val loss | val ppl "
        "(full split) | val bpc | train time | ms/iter |"
    )
    rows = [head, "|" + "---|" * 10]
    for r in results:
        rows.append(
            f"| {r['name']} | {r['backend']} | {r['params_non_embedding'] / 1e6:.2f}M "
            f"| {r['max_iters']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} "
            f"| {r['val_ppl']:.3f} | {r['val_bpc']:.3f} | {r['train_wall_s'] / 60:.1f} min "
            f"| {r['ms_per_iter']:.1f} |"
        )
    return "\n".join(rows) + "\n"


def write_results(sweep: Sweep, results: list[dict]) -> Path:
    out = Path(sweep.results)
    out.mkdir(parents=True, exist_ok=True)
    jsonfile.write_json(out / "results.json", results)
    lines = [f"# {sweep.name}: results\n", results_table(results), "\n## Samples\n"]
    for r in results:
        lines.append(f"\n### {r['name']}\n\n```\n{r['sample'].strip()}\n```\n")
    with atomic.atomic_file(out / "results.md") as tmp:
        tmp.write_text("".join(lines))
    return out
