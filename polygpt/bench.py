"""`polygpt bench`: one checkpoint measured on every backend x device x precision available.

For each configuration (e.g. torch/cpu/int8, mlx/gpu/fp16) this measures, with a warm-up and
repeats (median, min, max, spread):

- prefill tokens/s: full-context prompts (B, block_size) through `Backend.prefill`;
- decode tokens/s with the KV cache: `generate` end to end (sampling and window slides
  included), one stream and batched (aggregate tokens/s);
- decode tokens/s without a cache, nanoGPT's method (`uncached_generate`: a full forward over
  the cropped context per token), same prompts and sampler: the baseline the cache is for;
- training tokens/s (fp32 and bf16 configurations: `train.dtype`), the run's batch shape;
- saved size (bytes of model.safetensors at that precision, as `polygpt quantize` writes
  it), weights in memory (`Backend.model_bytes`), peak memory (the process's peak RSS
  while loading and running inference, before the training rate and the saved size load
  another fp32 copy; accelerator allocator stats where a backend reports them);
- perplexity on a fixed validation subset (the first `ppl_tokens` tokens; the whole split with
  `full_ppl`) with polygpt.evaluate, non-overlapping windows (stride = block_size), measured
  first and in full for every configuration so all are scored on the same tokens.

Speed measurements are bounded: `budget_s` per rate and `config_budget_s` per configuration; a
decode run that would not fit is reported from a short probe run (marked), so one very slow
configuration (e.g. fp16 on a CPU without fp16 arithmetic) costs a minute, not an hour.

Each configuration runs in its own subprocess (`python -m polygpt.bench --worker ...`): its
peak RSS is its own, thread settings and compiled kernels do not leak between configurations,
and a backend that crashes is one failed row, not a failed benchmark. What is not available
(framework not installed, no such device, precision unsupported) is a skipped row with the
reason. Outputs: results.json (everything), results.csv (one row per configuration),
results.md (the table, also returned for printing) and PNG charts (matplotlib).

Like every workflow, this talks to backends only through the Backend protocol: no torch or
mlx import here; versions are read from package metadata.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from polygpt.backends import available_backends, get_backend, known_backends
from polygpt.backends.base import PRECISIONS
from polygpt.errors import PolygptError

# The devices `--devices auto` tries per backend (an unavailable one is a skipped row).
DEVICES = {"torch": ("cpu", "cuda", "mps"), "mlx": ("cpu", "gpu")}
TRAIN_DTYPES = ("fp32", "bf16")  # the precisions that also measure a training step
PROBE_TOKENS = 8  # decode probe: warms up and predicts a full run's cost


@dataclass
class BenchConfig:
    checkpoint: str
    backends: list[str] | None = None  # None: every known backend (missing ones are skipped)
    devices: list[str] | None = None  # None: auto, every device each backend knows
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 64])
    prompt_tokens: int = 16  # decode prompts: the first tokens of the validation split
    new_tokens: int = 128  # tokens generated per decode run
    repeats: int = 3  # timed runs per measurement (fewer when a run exceeds the budget)
    warmup: int = 1
    budget_s: float = 5.0  # per measurement: stop repeating once this much time is spent
    config_budget_s: float = 45.0  # per configuration's speed part: measurements shrink to fit
    train_steps: int = 10  # timed training steps per repeat (0: no training rate)
    train_warmup: int = 5
    ppl_tokens: int = 50_000  # fixed validation subset for perplexity (0: skip)
    full_ppl: bool = False
    threads: int = -1  # >0: OMP/MKL/OpenBLAS threads for all; 0: frameworks'; -1: auto
    data_dir: str | None = None  # prepared data [the checkpoint's data.dir]
    timeout_s: float = 900.0  # per configuration subprocess
    nocache: bool = True  # also time decoding without the KV cache
    limits: bool = True  # measure memory bandwidth and matmul peak, print fractions of them

    def validate(self) -> None:
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise PolygptError(
                f"unknown precision {unknown[0]!r} (choose from {', '.join(PRECISIONS)})"
            )
        if self.backends is not None:
            bad = [b for b in self.backends if b not in known_backends()]
            if bad:
                raise PolygptError(
                    f"unknown backend {bad[0]!r} (choose from {', '.join(known_backends())})"
                )
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise PolygptError("--batch-sizes must be positive integers")
        if self.new_tokens < 1 or self.prompt_tokens < 1 or self.repeats < 1:
            raise PolygptError("new tokens, prompt tokens and repeats must be >= 1")


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


# ---- timing helpers (also used by the worker) ---------------------------------------------


def stats(values: list[float]) -> dict:
    """Median, min, max, count and spread ((max - min) / median, in %) of positive rates."""
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    return {
        "median": med,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(len(v)),
        "spread_pct": float(100 * (v.max() - v.min()) / med) if med > 0 else 0.0,
    }


def timed_rate(
    fn: Callable[[], object], work: float, repeats: int, warmup: int, budget_s: float
) -> dict:
    """Rate (work per second) of `fn`: `warmup` untimed calls, then up to `repeats` timed ones
    within `budget_s` (at least one). A warm-up that alone takes half the budget counts as the
    one sample, so a very slow configuration costs one run, not four."""
    samples: list[float] = []
    for _ in range(warmup):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        if dt > budget_s / 2:
            samples.append(work / dt)
            break
    start = time.perf_counter()
    while len(samples) < repeats and not (samples and time.perf_counter() - start > budget_s):
        t = time.perf_counter()
        fn()
        samples.append(work / (time.perf_counter() - t))
    return stats(samples)


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
    forward on a busy 2-core box ran 10-30x slower than a 1-thread one. So when the 1-minute
    load average says k cores are busy, each framework gets cpu_count - k threads (at least
    1); on an idle machine (k = 0) the frameworks keep their own defaults."""
    n = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = int(load)
    if busy == 0:
        return 0, f"frameworks' defaults (auto: load {load:.2f} on {n} CPUs)"
    t = max(1, n - busy)
    return t, f"{t} (auto: load {load:.2f} on {n} CPUs)"


# ---- one configuration (runs in a worker subprocess) --------------------------------------


def _saved_size(be, model, ckpt, precision: str) -> tuple[float | None, str | None]:
    """MB on disk of model.safetensors at this precision: the checkpoint's own file when it is
    already that precision, else what `polygpt quantize` writes (int8/int4: packed weights,
    scales and biases; fp16/bf16: a cast), else what `Backend.save_model` writes; or None and
    why not."""
    from polygpt import weights

    have = weights.check_model_file(ckpt.model_file, ckpt.spec)
    if {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}.get(have, have) == precision:
        return ckpt.model_file.stat().st_size / 1e6, None
    with tempfile.TemporaryDirectory() as d:
        try:
            from polygpt.quantize import quantize_checkpoint
        except ImportError:
            quantize_checkpoint = None
        if quantize_checkpoint is not None and precision != "fp32":
            try:
                quantize_checkpoint(ckpt.path, Path(d) / "q", precision, backend=be.name)
                return (Path(d) / "q" / weights.MODEL_FILE).stat().st_size / 1e6, None
            except PolygptError as e:
                note = f"polygpt quantize: {e}"
            except Exception as e:  # noqa: BLE001 - a failure to write is a note, not a crash
                note = f"polygpt quantize failed ({type(e).__name__}: {e})"
            return None, note[:200]
        path = Path(d) / weights.MODEL_FILE
        try:
            be.save_model(model, path, weights.model_metadata(ckpt.spec, precision=precision))
        except Exception as e:  # noqa: BLE001
            return None, f"cannot be saved as safetensors ({type(e).__name__}: {e})"[:200]
        return path.stat().st_size / 1e6, None


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # bytes on macOS, KiB else


def _train_rate(
    be, ckpt, spec, dtype: str, cfg: BenchConfig, data_dir: str, deadline: float
) -> dict:
    """Training tokens/s with the run's batch shape, from the checkpoint's weights."""
    from polygpt import config, data

    run = config.from_dict({"train": dict(ckpt.config.get("run", {}).get("train", {}))})
    tc = run.train
    tc.dtype = dtype
    tc.compile = False
    # the thread count the backend runs inference at, fixed (no auto-tuning mid-measurement)
    try:
        tc.threads = int(be.describe().get("threads", "0"))
    except ValueError:
        tc.threads = 0
    model = be.load_model(spec, ckpt.model_file, "fp32")
    opt = be.make_optimizer(model, tc)
    arr = data.load_split(data_dir, "train")
    rng = np.random.default_rng(0)

    def steps(n: int) -> None:
        loss = None
        for _ in range(n):
            batches = [
                data.get_batch(arr, spec.block_size, tc.batch_size, rng)
                for _ in range(tc.grad_accum)
            ]
            loss = be.train_step(model, opt, batches, tc.lr, tc.grad_clip, dtype)
        float(loss)  # wait for the queued steps

    t = time.perf_counter()
    steps(max(1, cfg.train_warmup))  # allocations, compiled steps (MLX), optimizer state
    per_step = (time.perf_counter() - t) / max(1, cfg.train_warmup)
    # as many steps per timed run as fit the budget (at least 2), fewer runs when late
    n = max(2, min(cfg.train_steps, int(cfg.budget_s / max(cfg.repeats, 1) / per_step)))
    repeats = cfg.repeats if time.perf_counter() + per_step * n * cfg.repeats < deadline else 1
    tokens = n * tc.batch_size * tc.grad_accum * spec.block_size
    res = timed_rate(lambda: steps(n), tokens, repeats, 0, cfg.budget_s)
    res["steps"] = n
    res["batch"] = f"{tc.batch_size}x{spec.block_size}" + (
        f"x{tc.grad_accum}" if tc.grad_accum > 1 else ""
    )
    res["dtype"] = dtype
    return res


def _decode_rate(fn, be, model, T: int, prompts, gen, cfg: BenchConfig, deadline: float) -> dict:
    """Tokens/s of `fn` (generate or uncached_generate) for cfg.new_tokens per stream. A short
    probe run (PROBE_TOKENS) warms up and predicts the cost: when one full run would not fit
    the budget, the probe's rate is the result (`"probe": true`), so a very slow configuration
    costs seconds, not minutes."""
    import dataclasses

    B = len(prompts)
    probe = dataclasses.replace(gen, max_new_tokens=min(PROBE_TOKENS, gen.max_new_tokens))
    dt = math.inf
    for _ in range(2):  # the first probe may be mostly warm-up (allocation, kernel builds)
        t = time.perf_counter()
        fn(be, model, T, prompts, probe)
        dt = min(dt, time.perf_counter() - t)
        est = dt * gen.max_new_tokens / probe.max_new_tokens
        fits = est <= min(cfg.budget_s, max(deadline - time.perf_counter(), 0.0))
        if fits:
            break
    if not fits:
        return {**stats([B * probe.max_new_tokens / dt]), "probe": True}
    rate = dict(repeats=cfg.repeats, warmup=0, budget_s=cfg.budget_s)
    return timed_rate(lambda: fn(be, model, T, prompts, gen), B * gen.max_new_tokens, **rate)


def run_config(cfg: BenchConfig, backend: str, device: str, precision: str) -> dict:
    """Measure one configuration in this process; returns its result row."""
    from polygpt import data, evaluate, inference
    from polygpt.generate import GenerationConfig, generate, uncached_generate

    row: dict = {
        "backend": backend,
        "device": device,
        "precision": precision,
        "status": "ok",
        "reason": None,
    }
    t_start = time.perf_counter()
    try:
        get_backend(backend, device)
    except PolygptError as e:  # no such device here: no precision of it will run
        return {**row, "status": "skipped", "reason": str(e), "scope": "device"}
    try:
        lm = inference.load(cfg.checkpoint, backend=backend, device=device, precision=precision)
    except PolygptError as e:
        return {**row, "status": "skipped", "reason": str(e), "scope": "precision"}
    be, model, spec, ckpt = lm.backend, lm.model, lm.spec, lm.checkpoint
    row["load_s"] = time.perf_counter() - t_start
    row["describe"] = be.describe()
    weights_mb = None
    if hasattr(be, "model_bytes"):
        weights_mb = be.model_bytes(model) / 1e6

    data_dir = cfg.data_dir or ckpt.config.get("run", {}).get("data", {}).get("dir")
    if not data_dir:
        raise PolygptError(f"{cfg.checkpoint} does not record its data directory: pass --data")
    val = data.load_split(data_dir, "val")
    T = spec.block_size
    if len(val) < T * max(cfg.batch_sizes) + 1:
        raise PolygptError(f"the validation split is too short for batch {max(cfg.batch_sizes)}")
    prompt = [int(t) for t in val[: min(cfg.prompt_tokens, T)]]
    gen = GenerationConfig(max_new_tokens=cfg.new_tokens, temperature=0.8, seed=1337)
    rate = dict(repeats=cfg.repeats, warmup=cfg.warmup, budget_s=cfg.budget_s)

    # perplexity first and always on the whole fixed subset: every configuration is scored
    # on the same tokens (stride = block_size, the non-overlapping pass), whatever it costs;
    # the speed measurements after it share what is left of the configuration's time budget
    char = ckpt.tokenizer.get("type") == "char"
    for key, n in (("ppl", cfg.ppl_tokens), ("ppl_full", len(val) if cfg.full_ppl else 0)):
        if n:
            res = evaluate.perplexity(
                be, model, val[:n], T, stride=T, vocab_size=spec.vocab_size, char_level=char
            )
            row[key] = _ppl(res)

    row["prefill"], row["decode_kv"], row["decode_nocache"] = {}, {}, {}
    deadline = time.perf_counter() + cfg.config_budget_s
    for B in cfg.batch_sizes:
        tokens = np.asarray(val[: B * T], dtype=np.int64).reshape(B, T)
        pad = np.zeros(B, dtype=np.int64)

        def prefill(tokens=tokens, pad=pad):
            be.prefill(model, tokens, pad)  # returns logits as NumPy: the work is done
            be.synchronize()

        row["prefill"][f"b{B}"] = timed_rate(prefill, B * T, **rate)
        prompts = [prompt] * B
        for key, fn in (("decode_kv", generate), ("decode_nocache", uncached_generate)):
            if key == "decode_nocache" and not cfg.nocache:
                continue
            row[key][f"b{B}"] = _decode_rate(fn, be, model, T, prompts, gen, cfg, deadline)

    # the peak of inference alone: the training rate and the saved size (quantize_checkpoint)
    # below load another fp32 copy of the weights
    inference_peak_mb = _peak_rss_mb()
    row["size_mb"], row["size_note"] = _saved_size(be, model, ckpt, precision)
    if precision in TRAIN_DTYPES and cfg.train_steps > 0:
        del model, lm  # training loads its own fp32 copy
        try:
            row["train"] = _train_rate(be, ckpt, spec, precision, cfg, data_dir, deadline)
        except PolygptError as e:
            row["train"] = {"skipped": str(e)}
    after = be.describe()  # accelerator allocator stats, when a backend reports them
    row["memory"] = {
        "peak_rss_mb": inference_peak_mb,
        "peak_rss_mb_all": _peak_rss_mb(),
        "weights_mb": weights_mb,
        **{k: v for k, v in after.items() if "memory" in k},
    }
    row["wall_s"] = time.perf_counter() - t_start
    return row


def _ppl(res) -> dict:
    return {
        "perplexity": res.perplexity,
        "nll": res.nll,
        "bits_per_char": res.bits_per_char,
        "tokens": res.tokens,
        "method": res.method,
        "stride": res.stride,
        "tokens_per_s": res.tokens_per_s,
    }


# ---- orchestration ---------------------------------------------------------------------------


def _plan(cfg: BenchConfig) -> list[tuple[str, str, str]]:
    backends = cfg.backends or known_backends()
    out = []
    for b in backends:
        devices = cfg.devices or list(DEVICES.get(b, ("cpu",)))
        for d in devices:
            for p in cfg.precisions:
                out.append((b, d, p))
    return out


def _run_worker(cfg: BenchConfig, b: str, d: str, p: str, log_dir: Path) -> dict:
    """Run one configuration in a fresh interpreter; its row, or an error row."""
    row = {"backend": b, "device": d, "precision": p}
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
        cmd = [
            sys.executable,
            "-m",
            "polygpt.bench",
            "--worker",
            str(args_file),
            "--result",
            str(result_file),
        ]
        try:
            with open(log_path, "w") as logf:
                proc = subprocess.run(
                    cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=cfg.timeout_s
                )
        except subprocess.TimeoutExpired:
            return {**row, "status": "error", "reason": f"timed out after {cfg.timeout_s:.0f}s"}
        if proc.returncode == 0 and result_file.exists():
            return json.loads(result_file.read_text())
    tail = log_path.read_text().strip().splitlines()[-1:] if log_path.exists() else []
    reason = tail[0][:300] if tail else f"exit status {proc.returncode}"
    return {**row, "status": "error", "reason": reason}


def run_bench(
    cfg: BenchConfig, out: str | Path, log: Callable[[str], None] = lambda s: None
) -> dict:
    """Run every configuration and write results.json, results.csv, results.md and charts."""
    from polygpt import weights

    cfg.validate()
    ckpt = weights.read_checkpoint(cfg.checkpoint)  # fail early on a bad path
    out = Path(out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    installed = set(available_backends())
    threads_note = None
    if cfg.threads < 0:
        cfg.threads, threads_note = auto_threads()
    rows = []
    t0 = time.perf_counter()
    ceilings = None
    if cfg.limits:
        from polygpt import limits

        log("measuring memory bandwidth and matmul peak ...")
        ceilings = limits.measure(max(cfg.threads, 0))
    for b, d, p in _plan(cfg):
        if b not in installed:
            rows.append(
                {
                    "backend": b,
                    "device": d,
                    "precision": p,
                    "status": "skipped",
                    "reason": f"{b} is not installed (pip install 'polygpt[{b}]')",
                }
            )
            continue
        # a device found missing once is missing for every precision: skip without a worker
        missing = next(
            (
                r
                for r in rows
                if r["backend"] == b and r["device"] == d and r.get("scope") == "device"
            ),
            None,
        )
        if missing is not None:
            rows.append(
                {
                    "backend": b,
                    "device": d,
                    "precision": p,
                    "status": "skipped",
                    "reason": missing["reason"],
                    "scope": "device",
                }
            )
            continue
        log(f"{b}/{d}/{p} ...")
        row = _run_worker(cfg, b, d, p, log_dir)
        rows.append(row)
        log(
            f"{b}/{d}/{p}: {row['status']}"
            + (f" ({row['reason']})" if row.get("reason") else f" in {row['wall_s']:.0f}s")
        )
    result = {
        "polygpt_bench": 1,
        "checkpoint": {
            "path": str(cfg.checkpoint),
            "spec": ckpt.spec.to_dict(),
            "step": ckpt.step,
            "params": ckpt.spec.num_params(),
            "params_total": ckpt.spec.num_params(False),
        },
        "environment": {
            **environment(),
            "threads": threads_note
            or (f"{cfg.threads} (--threads)" if cfg.threads else "frameworks' defaults"),
        },
        "settings": asdict(cfg),
        "limits": ceilings,
        "results": rows,
        "wall_s": time.perf_counter() - t0,
    }
    write_outputs(result, out)
    return result


# ---- outputs ---------------------------------------------------------------------------------


def _median(row: dict, group: str, key: str) -> float | None:
    v = row.get(group, {}).get(key)
    return v.get("median") if isinstance(v, dict) else None


def flat_row(row: dict, batch_sizes: list[int]) -> dict:
    """One CSV row: medians (tokens/s) plus min/max of each measurement."""
    d = row.get("describe") or {}
    flat = {
        "backend": row["backend"],
        "device": row["device"],
        "precision": row["precision"],
        "status": row["status"],
        "reason": row.get("reason") or "",
        "device_name": d.get("device_name", ""),
        "framework": d.get("framework", ""),
        "blas": d.get("blas", ""),
        "threads": d.get("threads", ""),
        "size_mb": row.get("size_mb"),
        "peak_rss_mb": (row.get("memory") or {}).get("peak_rss_mb"),
    }
    for group in ("prefill", "decode_kv", "decode_nocache"):
        for B in batch_sizes:
            v = (row.get(group) or {}).get(f"b{B}")
            for stat in ("median", "min", "max"):
                flat[f"{group}_b{B}_{stat}"] = v.get(stat) if v else None
    tr = row.get("train") or {}
    flat["train_tokens_per_s"] = tr.get("median")
    flat["train_min"], flat["train_max"] = tr.get("min"), tr.get("max")
    flat["ppl"] = (row.get("ppl") or {}).get("perplexity")
    flat["ppl_tokens"] = (row.get("ppl") or {}).get("tokens")
    flat["ppl_full"] = (row.get("ppl_full") or {}).get("perplexity")
    return flat


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def _rate_cell(v: dict | None) -> str:
    if not v or "median" not in v:
        return "-"
    if v.get("probe"):
        return f"{v['median']:,.0f}*"
    return f"{v['median']:,.0f} ±{v['spread_pct']:.0f}%" if v["n"] > 1 else f"{v['median']:,.0f}"


def markdown(result: dict) -> str:
    """The results table (tokens/s medians, ± the spread of the repeats) plus skipped rows."""
    bs = result["settings"]["batch_sizes"]
    big = max(bs)
    env = result["environment"]
    ck = result["checkpoint"]
    lines = [
        f"polygpt bench: `{ck['path']}` ({ck['params'] / 1e6:.2f}M parameters, step "
        f"{ck['step']}) on {env['cpu']}, {env['logical_cpus']} logical CPUs, {env['os']}, "
        f"Python {env['python']}; threads: {env.get('threads', '?')}",
        "",
    ]
    head = [
        "backend",
        "device",
        "precision",
        "size MB",
        "peak RSS MB",
        "prefill b1",
        *([f"prefill b{big}"] if big != 1 else []),
    ]
    for B in bs:
        head.append(f"KV decode b{B}")
    for B in bs:
        head.append(f"no-cache b{B}")
    head += ["KV speed-up b1", "train tok/s", "ppl"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    ok = [r for r in result["results"] if r["status"] == "ok"]
    for r in ok:
        kv1, nc1 = _median(r, "decode_kv", "b1"), _median(r, "decode_nocache", "b1")
        tr = r.get("train") or {}
        cells = [
            r["backend"],
            r["device"],
            r["precision"],
            _fmt(r.get("size_mb"), 2),
            _fmt((r.get("memory") or {}).get("peak_rss_mb")),
            _rate_cell(r["prefill"].get("b1")),
            *([_rate_cell(r["prefill"].get(f"b{big}"))] if big != 1 else []),
        ]
        cells += [_rate_cell(r["decode_kv"].get(f"b{B}")) for B in bs]
        cells += [_rate_cell(r["decode_nocache"].get(f"b{B}")) for B in bs]
        cells.append(f"{kv1 / nc1:.1f}x" if kv1 and nc1 else "-")
        cells.append(_rate_cell(tr) if "median" in tr else "-")
        ppl = (r.get("ppl") or {}).get("perplexity")
        n = (r.get("ppl") or {}).get("tokens")
        full = (r.get("ppl_full") or {}).get("perplexity")
        short = n is not None and n + 1 < result["settings"]["ppl_tokens"]
        cells.append(
            _fmt(ppl, 4)
            + (f" ({n + 1:,} tok)" if short else "")
            + (f" (full {full:.4f})" if full else "")
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Rates are tokens/s (median of repeats, ± (max - min) / median). Decode: "
        f"{result['settings']['new_tokens']} new tokens per stream, sampling and window "
        "slides included; bN = N streams as one batch (aggregate). ppl: first "
        f"{result['settings']['ppl_tokens']:,} validation tokens, non-overlapping windows. "
        f"* = the rate of a {PROBE_TOKENS}-token probe: a full run would not fit the time budget."
    )
    notes = [r for r in result["results"] if r["status"] != "ok" or r.get("size_note")]
    if notes:
        lines.append("")
        for r in notes:
            what = r["status"] if r["status"] != "ok" else "note"
            why = r.get("reason") or r.get("size_note")
            lines.append(f"- {r['backend']}/{r['device']}/{r['precision']}: {what}: {why}")
    lines += limit_lines(result)
    descs = {}
    for r in ok:
        d = r.get("describe") or {}
        descs.setdefault((r["backend"], r["device"]), d)
    if descs:
        lines.append("")
        for (b, dev), d in descs.items():
            lines.append(
                f"- {b}/{dev}: {d.get('framework', '?')}, {d.get('device_name', '?')}, "
                f"BLAS {d.get('blas', '?')}, threads {d.get('threads', '?')}"
            )
    return "\n".join(lines) + "\n"


def limit_lines(result: dict) -> list[str]:
    """Each configuration's batch-1 rates as fractions of the machine's ceilings (limits.py)."""
    lim = result.get("limits")
    if not lim:
        return []
    from polygpt import limits
    from polygpt.spec import ModelSpec

    spec = ModelSpec(**result["checkpoint"]["spec"])
    per_tok = limits.prefill_flops_per_token(spec, spec.block_size)
    out = [
        "",
        f"Machine ceilings (measured now, {lim['threads']} threads): memory read "
        f"{lim['read_gb_s']:.1f} GB/s, float32 matmul {lim['matmul_gflop_s']:.0f} GFLOP/s "
        "(NumPy's BLAS).",
    ]
    for r in result["results"]:
        if r["status"] != "ok":
            continue
        parts = []
        wmb = (r.get("memory") or {}).get("weights_mb")
        kv1 = _median(r, "decode_kv", "b1")
        if kv1 and wmb:
            bound = limits.decode_bound(wmb * 1e6, lim["read_gb_s"])
            parts.append(
                f"KV decode b1 {kv1:,.1f} tok/s = {100 * kv1 / bound:.0f}% of the bandwidth "
                f"bound {bound:,.1f} ({wmb:,.0f} MB of weights per token)"
            )
        pf1 = _median(r, "prefill", "b1")
        if pf1:
            frac = pf1 * per_tok / (lim["matmul_gflop_s"] * 1e9)
            parts.append(f"prefill b1 = {100 * frac:.0f}% of the matmul peak")
        rss = (r.get("memory") or {}).get("peak_rss_mb")
        if rss and wmb:
            parts.append(f"peak RSS {rss / wmb:.2f}x the weights")
        if parts:
            out.append(f"- {r['backend']}/{r['device']}/{r['precision']}: " + "; ".join(parts))
    return out


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    bs = result["settings"]["batch_sizes"]
    flats = [flat_row(r, bs) for r in result["results"]]
    with open(out / "results.csv", "w", newline="") as f:
        fields = list(flats[0]) if flats else ["backend", "device", "precision", "status"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for fr in flats:
            w.writerow({k: "" if v is None else v for k, v in fr.items()})
    (out / "results.md").write_text(markdown(result))
    write_charts(result, out)


def write_charts(result: dict, out: Path) -> list[Path]:
    """tokens_per_s.png (decode/prefill rates by configuration, log scale) and
    ppl_vs_size.png (perplexity against saved size)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PolygptError("charts need matplotlib: pip install 'polygpt[plot]'") from None
    ok = [r for r in result["results"] if r["status"] == "ok"]
    bs = result["settings"]["batch_sizes"]
    big = max(bs)
    labels = [f"{r['backend']}/{r['device']}/{r['precision']}" for r in ok]
    series = [
        ("KV decode b1", "decode_kv", "b1"),
        ("no-cache b1", "decode_nocache", "b1"),
        (f"KV decode b{big}", "decode_kv", f"b{big}"),
        (f"no-cache b{big}", "decode_nocache", f"b{big}"),
        (f"prefill b{big}", "prefill", f"b{big}"),
    ]
    paths = []
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(ok) + 2), 4.5))
    width = 0.8 / len(series)
    x = np.arange(len(ok))
    for i, (name, group, key) in enumerate(series):
        vals = [_median(r, group, key) or 0 for r in ok]
        ax.bar(x + (i - len(series) / 2 + 0.5) * width, vals, width, label=name)
    tr = [(r.get("train") or {}).get("median") or 0 for r in ok]
    if any(tr):
        ax.scatter(x, tr, marker="D", color="black", zorder=3, label="training")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log)")
    ax.set_title("polygpt bench: tokens/s by configuration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "tokens_per_s.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {"torch": "o", "mlx": "s"}
    colors = dict(zip(PRECISIONS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    stacked: dict[tuple, int] = {}  # labels at the same spot go one above the other
    for r, label in zip(ok, labels):
        ppl = (r.get("ppl") or {}).get("perplexity")
        if ppl is None or not r.get("size_mb"):
            continue
        ax.scatter(
            r["size_mb"],
            ppl,
            marker=markers.get(r["backend"], "^"),
            color=colors.get(r["precision"]),
            zorder=3,
        )
        spot = (round(r["size_mb"], 1), round(ppl, 2))
        k = stacked[spot] = stacked.get(spot, -1) + 1
        ax.annotate(
            label,
            (r["size_mb"], ppl),
            fontsize=7,
            xytext=(4, 3 + 9 * k),
            textcoords="offset points",
        )
    ax.set_xlabel("saved model size (MB)")
    ax.set_ylabel(f"perplexity ({result['settings']['ppl_tokens']:,} val tokens)")
    ax.set_title("perplexity vs size")
    fig.tight_layout()
    paths.append(out / "ppl_vs_size.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# ---- worker entry point ------------------------------------------------------------------


def _worker_main(argv: list[str]) -> int:
    args = dict(zip(argv[::2], argv[1::2]))
    spec = json.loads(Path(args["--worker"]).read_text())
    cfg = BenchConfig(**spec["config"])
    try:
        row = run_config(cfg, spec["backend"], spec["device"], spec["precision"])
    except PolygptError as e:
        row = {
            "backend": spec["backend"],
            "device": spec["device"],
            "precision": spec["precision"],
            "status": "error",
            "reason": str(e),
        }
    Path(args["--result"]).write_text(json.dumps(row, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
