"""`polygpt bench`, measuring: one backend x device x precision in this process.

Runs inside a worker subprocess (`python -m polygpt.bench.measure ARGS RESULT`, started by
run.py), so its peak RSS, thread settings and compiled kernels are its own. What one
configuration measures, with a warm-up and repeats (median, min, max, spread):

- prefill tokens/s: full-context prompts (B, block_size) through `Backend.prefill_rows`;
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
Results are dataclasses (Rate, Perplexity, Row), written as JSON by the worker.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from polygpt import checkpoints, config, data, evaluate, inference, modelfile
from polygpt.backends import get_backend, known_backends
from polygpt.backends.base import PRECISIONS
from polygpt.errors import PolygptError
from polygpt.generate import GenerationConfig, generate, uncached_generate
from polygpt.quantize import quantize_checkpoint

PROBE_TOKENS = 8  # decode probe: warms up and predicts a full run's cost


BUDGET_BYTES = 100e6  # the weights the time budgets are set for (see BenchConfig)


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
    # time budgets for a model of up to BUDGET_BYTES of weights, scaled up with the weights'
    # bytes, so a large model's rates rest on as many tokens
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


@dataclass
class Rate:
    """Work per second over repeated runs: median, min, max, count and spread
    ((max - min) / median, in %). `probe`: the rate of a short probe run, a full run would not
    have fit the time budget."""

    median: float
    min: float
    max: float
    n: int
    spread_pct: float
    probe: bool = False


@dataclass
class TrainRate(Rate):
    steps: int = 0  # optimizer steps per timed run
    batch: str = ""  # e.g. "12x64" (batch x block), "x4" with gradient accumulation
    dtype: str = "fp32"


@dataclass
class Perplexity:
    perplexity: float
    nll: float
    bits_per_char: float | None
    tokens: int
    method: str
    stride: int
    tokens_per_s: float


@dataclass
class Row:
    """One configuration's result; status "ok", "skipped" (with the reason; scope "device"
    when the device is missing, so none of its precisions run) or "error"."""

    backend: str
    device: str
    precision: str
    status: str = "ok"
    reason: str | None = None
    scope: str | None = None
    load_s: float | None = None
    describe: dict = field(default_factory=dict)  # Backend.describe()
    kernel: str = ""  # what this precision's matmuls run on (Backend.kernel)
    size_mb: float | None = None
    size_note: str | None = None  # why size_mb is missing
    ppl: Perplexity | None = None
    ppl_full: Perplexity | None = None
    prefill: dict[str, Rate] = field(default_factory=dict)  # "b<batch size>" -> rate
    decode_kv: dict[str, Rate] = field(default_factory=dict)
    decode_nocache: dict[str, Rate] = field(default_factory=dict)
    train: TrainRate | None = None
    train_skipped: str | None = None
    memory: dict = field(default_factory=dict)  # peak_rss_mb, weights_mb, allocator stats
    wall_s: float | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.device}/{self.precision}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for key in ("prefill", "decode_kv", "decode_nocache"):
            kw[key] = {b: Rate(**v) for b, v in (d.get(key) or {}).items()}
        for key in ("ppl", "ppl_full"):
            kw[key] = Perplexity(**d[key]) if d.get(key) else None
        kw["train"] = TrainRate(**d["train"]) if d.get("train") else None
        return cls(**kw)


@dataclass
class BenchResult:
    checkpoint: dict  # path, spec, step, parameter counts
    environment: dict  # machine, versions, load, threads
    settings: BenchConfig
    results: list[Row]
    wall_s: float
    limits: dict | None = None  # limits.measure(): the machine's memory and matmul ceilings
    polygpt_bench: int = 1  # the results.json format

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"polygpt_bench": d.pop("polygpt_bench"), **d}


# ---- timing --------------------------------------------------------------------------------


def stats(values: list[float]) -> Rate:
    """Median, min, max, count and spread of positive rates."""
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    return Rate(
        median=med,
        min=float(v.min()),
        max=float(v.max()),
        n=int(len(v)),
        spread_pct=float(100 * (v.max() - v.min()) / med) if med > 0 else 0.0,
    )


def timed_rate(
    fn: Callable[[], object], work: float, repeats: int, warmup: int, budget_s: float
) -> Rate:
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


# ---- one configuration -----------------------------------------------------------------------


def _saved_size(be, model, ckpt, precision: str) -> tuple[float | None, str | None]:
    """MB on disk of model.safetensors at this precision: the checkpoint's own file when it is
    already that precision, else what `polygpt quantize` writes (int8/int4: packed weights,
    scales and biases; fp16/bf16: a cast), else what `Backend.save_model` writes; or None and
    why not."""
    if ckpt.model.precision == precision:
        return ckpt.model_file.stat().st_size / 1e6, None
    with tempfile.TemporaryDirectory() as d:
        if precision != "fp32":
            try:
                quantize_checkpoint(ckpt.path, Path(d) / "q", precision, backend=be.name)
                return (Path(d) / "q" / checkpoints.MODEL_FILE).stat().st_size / 1e6, None
            except PolygptError as e:
                note = f"polygpt quantize: {e}"
            except Exception as e:  # noqa: BLE001 - a failure to write is a note, not a crash
                note = f"polygpt quantize failed ({type(e).__name__}: {e})"
            return None, note[:200]
        path = Path(d) / checkpoints.MODEL_FILE
        try:
            be.save_model(model, path, modelfile.metadata(ckpt.spec, precision=precision))
        except Exception as e:  # noqa: BLE001
            return None, f"cannot be saved as safetensors ({type(e).__name__}: {e})"[:200]
        return path.stat().st_size / 1e6, None


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # bytes on macOS, KiB else


def _train_rate(
    be, ckpt, spec, dtype: str, cfg: BenchConfig, data_dir: str, deadline: float
) -> TrainRate:
    """Training tokens/s with the run's batch shape, from the checkpoint's weights."""
    run = config.from_dict({"train": dict(ckpt.config.get("run", {}).get("train", {}))})
    tc = run.train
    tc.dtype = dtype
    tc.compile = False
    # the thread count the backend runs inference at, fixed (no auto-tuning mid-measurement)
    try:
        tc.threads = int(be.describe().get("threads", "0"))
    except ValueError:
        tc.threads = 0
    model = be.load_model(ckpt.model, "fp32")
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
    batch = f"{tc.batch_size}x{spec.block_size}" + (
        f"x{tc.grad_accum}" if tc.grad_accum > 1 else ""
    )
    return TrainRate(**asdict(res), steps=n, batch=batch, dtype=dtype)


def _decode_rate(fn, be, model, T: int, prompts, gen, cfg: BenchConfig, deadline: float) -> Rate:
    """Tokens/s of `fn` (generate or uncached_generate) for cfg.new_tokens per stream. A short
    probe run (PROBE_TOKENS) warms up and predicts the cost: when one full run would not fit
    the budget, the probe's rate is the result (`probe` set), so a very slow configuration
    costs seconds, not minutes."""
    B = len(prompts)
    probe = replace(gen, max_new_tokens=min(PROBE_TOKENS, gen.max_new_tokens))
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
        return replace(stats([B * probe.max_new_tokens / dt]), probe=True)
    rate = dict(repeats=cfg.repeats, warmup=0, budget_s=cfg.budget_s)
    return timed_rate(lambda: fn(be, model, T, prompts, gen), B * gen.max_new_tokens, **rate)


def measure(cfg: BenchConfig, backend: str, device: str, precision: str) -> Row:
    """Measure one configuration in this process; returns its result row."""
    row = Row(backend, device, precision)
    t_start = time.perf_counter()
    try:
        get_backend(backend, device)
    except PolygptError as e:  # no such device here: no precision of it will run
        return replace(row, status="skipped", reason=str(e), scope="device")
    try:
        lm = inference.load(cfg.checkpoint, backend=backend, device=device, precision=precision)
    except PolygptError as e:
        return replace(row, status="skipped", reason=str(e), scope="precision")
    be, spec, ckpt = lm.backend, lm.spec, lm.checkpoint
    row.load_s = time.perf_counter() - t_start
    row.describe = be.describe()
    row.kernel = be.kernel(lm.precision)
    weights_mb = be.model_bytes(lm.model) / 1e6 if hasattr(be, "model_bytes") else None
    if weights_mb is not None:
        scale = max(1.0, weights_mb * 1e6 / BUDGET_BYTES)
        cfg = replace(
            cfg, budget_s=cfg.budget_s * scale, config_budget_s=cfg.config_budget_s * scale
        )
    data_dir = cfg.data_dir or ckpt.config.get("run", {}).get("data", {}).get("dir")
    if not data_dir:
        raise PolygptError(f"{cfg.checkpoint} does not record its data directory: pass --data")
    val = data.load_split(data_dir, "val")
    if len(val) < spec.block_size * max(cfg.batch_sizes) + 1:
        raise PolygptError(f"the validation split is too short for batch {max(cfg.batch_sizes)}")
    _perplexities(row, lm, val, cfg)
    deadline = time.perf_counter() + cfg.config_budget_s
    _speeds(row, lm, val, cfg, deadline)

    # the peak of inference alone: the training rate and the saved size (quantize_checkpoint)
    # below load another fp32 copy of the weights
    inference_peak_mb = _peak_rss_mb()
    row.size_mb, row.size_note = _saved_size(be, lm.model, ckpt, precision)
    if precision in be.train_dtypes and cfg.train_steps > 0:  # a training step measured too
        del lm  # training loads its own fp32 copy
        try:
            row.train = _train_rate(be, ckpt, spec, precision, cfg, data_dir, deadline)
        except PolygptError as e:
            row.train_skipped = str(e)
    after = be.describe()  # accelerator allocator stats, when a backend reports them
    row.memory = {
        "peak_rss_mb": inference_peak_mb,
        "peak_rss_mb_all": _peak_rss_mb(),
        "weights_mb": weights_mb,
        **{k: v for k, v in after.items() if "memory" in k},
    }
    row.wall_s = time.perf_counter() - t_start
    return row


def _perplexities(row: Row, lm, val, cfg: BenchConfig) -> None:
    """Perplexity first and always on the whole fixed subset: every configuration is scored
    on the same tokens (stride = block_size, the non-overlapping pass), whatever it costs;
    the speed measurements after it share what is left of the configuration's time budget."""
    T = lm.spec.block_size
    char = lm.checkpoint.tokenizer.get("type") == "char"
    for key, n in (("ppl", cfg.ppl_tokens), ("ppl_full", len(val) if cfg.full_ppl else 0)):
        if n:
            res = evaluate.perplexity(
                lm.backend, lm.model, val[:n], T, stride=T, vocab_size=lm.spec.vocab_size,
                char_level=char,
            )  # fmt: skip
            setattr(row, key, _ppl(res))


def _speeds(row: Row, lm, val, cfg: BenchConfig, deadline: float) -> None:
    """Prefill and decode rates per batch size: decode with `polygpt sample`'s default
    sampler (GenerationConfig's defaults), on the first tokens of the validation split."""
    be, model, T = lm.backend, lm.model, lm.spec.block_size
    prompt = [int(t) for t in val[: min(cfg.prompt_tokens, T)]]
    gen = GenerationConfig(max_new_tokens=cfg.new_tokens)
    rate = dict(repeats=cfg.repeats, warmup=cfg.warmup, budget_s=cfg.budget_s)
    for B in cfg.batch_sizes:
        tokens = np.asarray(val[: B * T], dtype=np.int64).reshape(B, T)
        cache = be.slot_cache(model, B)

        def prefill(tokens=tokens, cache=cache):
            be.prefill_rows(cache, np.arange(len(tokens)), tokens)  # logits as NumPy: done
            be.synchronize()

        row.prefill[f"b{B}"] = timed_rate(prefill, B * T, **rate)
        prompts = [prompt] * B
        row.decode_kv[f"b{B}"] = _decode_rate(generate, be, model, T, prompts, gen, cfg, deadline)
        if cfg.nocache:
            row.decode_nocache[f"b{B}"] = _decode_rate(
                uncached_generate, be, model, T, prompts, gen, cfg, deadline
            )


def _ppl(res: evaluate.EvalResult) -> Perplexity:
    return Perplexity(
        perplexity=res.perplexity,
        nll=res.nll,
        bits_per_char=res.bits_per_char,
        tokens=res.tokens,
        method=res.method,
        stride=res.stride,
        tokens_per_s=res.tokens_per_s,
    )


# ---- worker entry point: python -m polygpt.bench.measure ARGS.json RESULT.json ----------------


def worker_main(argv: list[str]) -> int:
    args_file, result_file = argv
    spec = json.loads(Path(args_file).read_text())
    cfg = BenchConfig(**spec["config"])
    b, d, p = spec["backend"], spec["device"], spec["precision"]
    try:
        row = measure(cfg, b, d, p)
    except PolygptError as e:
        row = Row(b, d, p, status="error", reason=str(e))
    Path(result_file).write_text(json.dumps(row.to_dict(), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
