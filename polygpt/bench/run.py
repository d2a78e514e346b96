"""`polygpt bench`: one checkpoint measured on every backend x device x precision available.

This module orchestrates (the plan of configurations, one worker subprocess per configuration,
the machine's description); measure.py measures one configuration inside a worker, report.py
writes the results (JSON, CSV, Markdown) and charts.py draws them.

Each configuration runs in its own subprocess (`python -m polygpt.bench.measure ...`): its
peak RSS is its own, thread settings and compiled kernels do not leak between configurations,
and a backend that crashes is one failed row, not a failed benchmark. What is not available
(framework not installed, no such device, precision unsupported) is a skipped row with the
reason. Progress is reported as events (ConfigStart, ConfigDone) for the caller to print.

Like every workflow, this talks to backends only through the Backend protocol: no torch or
mlx import here; versions are read from package metadata.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from polygpt import checkpoints
from polygpt.backends import available_backends, backend_class, known_backends
from polygpt.bench import limits, report
from polygpt.bench.measure import BenchConfig, BenchResult, Row


def quick(cfg: BenchConfig) -> BenchConfig:
    """`--quick`: what a GPT-2-sized model needs to be judged in minutes on a CPU: batch 1,
    KV decode only, short runs, a smaller perplexity subset, no training rate."""
    return replace(
        cfg,
        batch_sizes=[1],
        new_tokens=min(cfg.new_tokens, 32),
        repeats=min(cfg.repeats, 2),
        ppl_tokens=min(cfg.ppl_tokens, 8192),
        train_steps=0,
        nocache=False,
        config_budget_s=min(cfg.config_budget_s, 30.0),
    )


@dataclass
class LimitsStart:
    """The machine's ceilings are being measured (a few seconds)."""


@dataclass
class ConfigStart:
    backend: str
    device: str
    precision: str


@dataclass
class ConfigDone:
    row: Row


# ---- environment ---------------------------------------------------------------------------


def _cpu_model() -> str:
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """The machine and software, without importing any framework."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("polygpt", "torch", "mlx", "numpy", "safetensors")},
        "load_average": None if load is None else [round(x, 2) for x in load],
        "threads_setting": os.environ.get("OMP_NUM_THREADS"),
    }


def auto_threads() -> tuple[int, str]:
    """Threads per framework for `--threads auto`: the cores other processes leave free.

    OpenMP runtimes (torch's) make every thread meet at a barrier after each op; on a machine
    whose cores are partly taken, that wait is a scheduler slice per op, and a 2-thread
    forward on a busy machine runs slower than a 1-thread one (docs/BENCHMARKS.md, "Figures
    behind the code"). So when the 1-minute
    load average says k cores are busy, each framework gets cpu_count - k threads (at least
    1); on an idle machine (k = 0) the frameworks keep their own defaults."""
    n = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = int(load)
    if busy == 0:
        return 0, f"frameworks' defaults (auto: load {load:.2f} on {n} CPUs)"
    t = max(1, n - busy)
    return t, f"{t} (auto: load {load:.2f} on {n} CPUs)"


# ---- orchestration ---------------------------------------------------------------------------


def plan(cfg: BenchConfig) -> list[tuple[str, str, str]]:
    """(backend, device, precision) of every configuration to try, in order. `--devices auto`
    tries every device the backend knows (an unavailable one is a skipped row); a backend that
    is not installed is one skipped row per precision on the CPU."""
    out = []
    installed = available_backends()
    for b in cfg.backends or known_backends():
        known = backend_class(b).devices if b in installed else ("cpu",)
        for d in cfg.devices or list(known):
            for p in cfg.precisions:
                out.append((b, d, p))
    return out


def _run_worker(cfg: BenchConfig, b: str, d: str, p: str, log_dir: Path) -> Row:
    """Run one configuration in a fresh interpreter; its row, or an error row."""
    log_path = log_dir / f"{b}-{d}-{p}.log"
    with tempfile.TemporaryDirectory() as tmp:
        args_file, result_file = Path(tmp) / "args.json", Path(tmp) / "result.json"
        args_file.write_text(
            json.dumps({"config": asdict(cfg), "backend": b, "device": d, "precision": p})
        )
        env = dict(os.environ)
        if cfg.threads > 0:  # (auto was resolved to a number or 0 by run_bench)
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[var] = str(cfg.threads)
        cmd = [sys.executable, "-m", "polygpt.bench.measure", str(args_file), str(result_file)]
        try:
            with open(log_path, "w") as logf:
                proc = subprocess.run(
                    cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=cfg.timeout_s
                )
        except subprocess.TimeoutExpired:
            return Row(b, d, p, status="error", reason=f"timed out after {cfg.timeout_s:.0f}s")
        if proc.returncode == 0 and result_file.exists():
            return Row.from_dict(json.loads(result_file.read_text()))
    tail = log_path.read_text().strip().splitlines()[-1:] if log_path.exists() else []
    reason = tail[0][:300] if tail else f"exit status {proc.returncode}"
    return Row(b, d, p, status="error", reason=reason)


def run_bench(
    cfg: BenchConfig,
    out: str | Path,
    on_event: Callable[[LimitsStart | ConfigStart | ConfigDone], None] = lambda ev: None,
) -> BenchResult:
    """Run every configuration and write results.json, results.csv, results.md and charts."""
    cfg.validate()
    ckpt = checkpoints.read(cfg.checkpoint)  # fail early on a bad path
    out = Path(out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    installed = set(available_backends())
    threads_note = None
    if cfg.threads < 0:
        cfg.threads, threads_note = auto_threads()
    rows: list[Row] = []
    missing: dict[tuple[str, str], str] = {}  # a device found missing once: skip its precisions
    t0 = time.perf_counter()
    ceilings = None
    if cfg.limits:
        on_event(LimitsStart())
        ceilings = limits.measure(max(cfg.threads, 0))
    for b, d, p in plan(cfg):
        if b not in installed:
            reason = f"{b} is not installed (pip install 'polygpt[{b}]')"
            rows.append(Row(b, d, p, status="skipped", reason=reason))
            continue
        if (b, d) in missing:
            rows.append(Row(b, d, p, status="skipped", reason=missing[b, d], scope="device"))
            continue
        on_event(ConfigStart(b, d, p))
        row = _run_worker(cfg, b, d, p, log_dir)
        if row.scope == "device":
            missing[b, d] = row.reason or ""
        rows.append(row)
        on_event(ConfigDone(row))
    result = BenchResult(
        checkpoint={
            "path": str(cfg.checkpoint),
            "spec": ckpt.spec.to_dict(),
            "step": ckpt.step,
            "params": ckpt.spec.num_params(),
            "params_total": ckpt.spec.num_params(False),
        },
        environment={
            **environment(),
            "threads": threads_note
            or (f"{cfg.threads} (--threads)" if cfg.threads else "frameworks' defaults"),
        },
        settings=cfg,
        results=rows,
        wall_s=time.perf_counter() - t0,
        limits=ceilings,
    )
    report.write_outputs(result, out)
    return result
