"""Speed, measured: polygpt against nanoGPT, and the engine's batch, interleaved rounds.

    .venv/bin/python scripts/bench_speed.py train [--rounds 5] [--cold] [key=value overrides...]
    .venv/bin/python scripts/bench_speed.py decode CHECKPOINT [--rounds 3]
    .venv/bin/python scripts/bench_speed.py rows CHECKPOINT [--backend torch] [--rows 16]
    .venv/bin/python scripts/bench_speed.py decode-rows CHECKPOINT [--precisions fp32,int8,int4]
        [--rows 1,16] [--steps 64] [--threads 2] [--json]

train: per round, nanoGPT's train.py loop (scripts/nanogpt_seeds.py train_seed: its model,
    batches, AdamW, `estimate_loss` every eval_interval and its checkpoint) and `polygpt train`
    of the same config with default settings, each in its own process: ms/iter over the span
    from the first to the last evaluation (the loop plus its evaluations), the step alone (the
    span less its evaluations), the evaluations' seconds and the process's wall time (start-up
    and any compile included); with --cold also polygpt with an empty inductor cache (the
    default one is warmed first). Speed-ups are medians of the rounds' nanoGPT / polygpt.
decode: per round, batch-1 tokens/s by the difference method (a SHORT- and a LONG-token run,
    so start-up cancels): `polygpt sample --temperature 0.8 --top-k 200` through the CLI, and
    nanoGPT's method (`uncached_generate`: a full forward over the cropped context per token,
    same weights and sampler) in a subprocess; default threads both.
rows: the engine's decode step (`decode_rows`) for one row and for N rows at once, rows of
    different lengths (a server's batch), on the checkpoint's weights in this process; per round
    the median ms of 200 steps each, the ratio N rows / 1 row.
decode-rows: the decode step alone (no sampling, no start-up; what llama-bench's tg test
    times), tokens/s for each precision and row count after a 16-token prompt per row, the
    precisions interleaved in each round (scripts/bench_llamacpp.sh runs it beside llama.cpp).

Rounds alternate which side goes first; every round's numbers are printed, then the medians.
Load average and thread counts are printed too: compare only numbers from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import machine  # scripts/machine.py

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _polygpt(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [PY, "-c", "from polygpt.cli import main; main()", *args]
    return subprocess.run(cmd, **{"env": ENV, "check": True, **kw})


def _span_ms(times: list[float], iters: int) -> float:
    return 1000 * (times[-1] - times[0]) / iters


@dataclass
class TrainRun:
    """One training process, timed: ms/iter over the first-to-last-evaluation span, the step
    alone (the span less its evaluations), every evaluation's seconds, the process's wall."""

    span_ms: float
    step_ms: float
    eval_s: float
    wall_s: float


def _timed(evals: list[dict], wall: float) -> TrainRun:
    iters = evals[-1]["step"] - evals[0]["step"]
    span = evals[-1]["time"] - evals[0]["time"]
    in_span = sum(e["eval_s"] for e in evals[1:])
    return TrainRun(
        1000 * span / iters, 1000 * (span - in_span) / iters, sum(e["eval_s"] for e in evals), wall
    )


def nano_run(cfg_path: str, overrides: list[str], out: Path) -> TrainRun:
    """nanoGPT's train.py loop (scripts/nanogpt_seeds.py train_seed) in its own process."""
    code = (
        "import json, pathlib;"
        "from nanogpt_seeds import config, data, train_seed;"
        f"cfg = config.load({cfg_path!r}, {overrides!r});"
        "splits = {s: data.load_split(cfg.data.dir, s) for s in ('train', 'val')};"
        f"r = train_seed(1337, cfg, splits, pathlib.Path({str(out)!r}));"
        "print(json.dumps(r['history']))"
    )
    t0 = time.perf_counter()
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scripts")])}
    res = subprocess.run(
        [PY, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    return _timed(json.loads(res.stdout.strip().splitlines()[-1]), wall)


def poly_run(cfg_path: str, overrides: list[str], out: Path, cache: str | None) -> TrainRun:
    """`polygpt train` with default settings in its own process; `cache`: the inductor cache
    directory to use (a fresh one: a cold start), None for the default (warm) one."""
    env = dict(ENV)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
    t0 = time.perf_counter()
    _polygpt(
        "train", cfg_path, *overrides, "--out", str(out), "--overwrite", "-q",
        cwd=ROOT, capture_output=True, env=env,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return _timed([json.loads(x) for x in lines if '"eval"' in x], wall)


def train_report(rounds: list[dict[str, TrainRun]]) -> None:
    sides = list(rounds[0])
    print(
        f"\n{'round':>5} {'side':<16}{'span ms/it':>11}{'step ms/it':>11}{'eval s':>8}{'wall s':>8}"
    )
    for i, r in enumerate(rounds, 1):
        for side in sides:
            t = r[side]
            print(
                f"{i:>5} {side:<16}{t.span_ms:11.1f}{t.step_ms:11.1f}{t.eval_s:8.1f}{t.wall_s:8.1f}"
            )
    print("\nmedians, and the median of the rounds' ratios nanoGPT / polygpt (> 1: polygpt faster)")
    for side in sides:
        med = {
            f: statistics.median(getattr(r[side], f) for r in rounds)
            for f in TrainRun.__dataclass_fields__
        }
        line = f"  {side:<16}" + "".join(f"{med[f]:11.1f}" for f in ("span_ms", "step_ms"))
        line += "".join(f"{med[f]:8.1f}" for f in ("eval_s", "wall_s"))
        if side != "nanoGPT":
            ratios = {
                f: statistics.median(getattr(r["nanoGPT"], f) / getattr(r[side], f) for r in rounds)
                for f in ("span_ms", "step_ms", "eval_s", "wall_s")
            }
            line += "   speed-up: " + ", ".join(f"{f} {v:.2f}x" for f, v in ratios.items())
        print(line)


def _write_train(args, res: list[dict[str, TrainRun]]) -> None:
    record = {
        "command": "scripts/bench_speed.py train " + " ".join(sys.argv[2:]),
        "date": time.strftime("%Y-%m-%d"),
        "cpu": machine.cpu(),
        "versions": machine.versions(),
        "load_average_after": _load(),
        "rounds": [{side: vars(t) for side, t in r.items()} for r in res],
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


def train_rounds(cfg_path: str, overrides: list[str], tmp: Path, rounds: int, cold: bool):
    """Interleaved rounds of nanoGPT, polygpt with a warm inductor cache and (`cold`) polygpt
    with an empty one, the order reversed every other round."""
    # one short run fills the default cache (what a compile needs is the same at any length)
    _polygpt(
        "train", cfg_path, *overrides, "max_iters=1", "eval_iters=1", "--out",
        str(tmp / "warmup"), "--overwrite", "-q", cwd=ROOT, capture_output=True,
    )  # fmt: skip
    res = []
    for r in range(rounds):
        runs = {
            "nanoGPT": partial(nano_run, cfg_path, overrides, tmp / f"ng{r}"),
            "polygpt": partial(poly_run, cfg_path, overrides, tmp / f"pg{r}", None),
        }
        if cold:
            cache = str(tmp / f"inductor{r}")
            runs["polygpt cold"] = partial(poly_run, cfg_path, overrides, tmp / f"pc{r}", cache)
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        got = {side: runs[side]() for side in order}
        res.append({side: got[side] for side in runs})
        print(
            f"round {r + 1}: "
            + ", ".join(f"{s} {t.span_ms:.1f} ms/it, {t.wall_s:.1f} s" for s, t in res[-1].items())
            + f"; load {_load()}",
            flush=True,
        )
    train_report(res)
    return res


def decode_round(ckpt: str, short: int, long: int, r: int) -> tuple[float, float]:
    """(nanoGPT-method tokens/s, polygpt sample tokens/s) at batch 1, difference method."""

    def sample(n: int) -> float:
        t = time.perf_counter()
        _polygpt(
            "sample", ckpt, "-n", str(n), "--temperature", "0.8", "--top-k", "200",
            "--no-stream", "--backend", "torch", capture_output=True,
        )  # fmt: skip
        return time.perf_counter() - t

    nano_code = (
        "import sys; from polygpt import inference;"
        "from polygpt.generate import GenerationConfig, uncached_generate;"
        f"lm = inference.load({ckpt!r}, backend='torch');"
        "cfg = GenerationConfig(max_new_tokens=int(sys.argv[1]), temperature=0.8, top_k=200);"
        "uncached_generate(lm.backend, lm.model, lm.spec.block_size, [lm.encode('\\n')], cfg)"
    )

    def nano(n: int) -> float:
        t = time.perf_counter()
        subprocess.run([PY, "-c", nano_code, str(n)], env=ENV, check=True)
        return time.perf_counter() - t

    def rate(f) -> float:
        return (long - short) / (f(long) - f(short))

    if r % 2:
        p = rate(sample)
        return rate(nano), p
    n = rate(nano)
    return n, rate(sample)


def rows_round(lm, n: int, steps: int = 200) -> tuple[float, float]:
    """Median ms of one decode step over 1 row and over n rows (lengths spread over the
    block, each row its own; the cache is refilled when a row would reach the block)."""
    import numpy as np

    be, block = lm.backend, lm.spec.block_size
    out = []
    for k in (1, n):
        cache = be.slot_cache(lm.model, k)
        rng = np.random.default_rng(k)
        lengths = rng.integers(1, block // 2, k) if k > 1 else np.array([block // 4])
        rows = np.arange(k)

        prompts = [rng.integers(0, 50, m) for m in lengths]
        be.prefill_rows(cache, rows, prompts)
        times = []
        for _ in range(steps):
            if cache.lengths.max() >= block - 1:
                be.prefill_rows(cache, rows, prompts)
            t = time.perf_counter()
            be.decode_rows(cache, rows, rng.integers(0, 50, k))
            times.append((time.perf_counter() - t) * 1e3)
        out.append(statistics.median(times))
    return out[0], out[1]


def decode_rows_rates(lms: dict, rows_list: list[int], steps: int, prompt: int = 16) -> list:
    """One round: per precision and row count, decode steps/s x rows (tokens/s) of `steps`
    decode_rows calls after a `prompt`-token prefill per row: the decode alone, as
    llama-bench's tg test times it (no sampling, no start-up)."""
    import numpy as np

    out = []
    for precision, lm in lms.items():
        be = lm.backend
        for n in rows_list:
            rng = np.random.default_rng(n)
            cache = be.slot_cache(lm.model, n)
            be.prefill_rows(cache, np.arange(n), [rng.integers(0, 50, prompt) for _ in range(n)])
            be.decode_rows(cache, np.arange(n), rng.integers(0, 50, n))  # warm
            t = time.perf_counter()
            for _ in range(steps):
                be.decode_rows(cache, np.arange(n), rng.integers(0, 50, n))
            dt = time.perf_counter() - t
            out.append(dict(precision=precision, rows=n, steps=steps, tokens_per_s=n * steps / dt,
                            ms_per_step=1e3 * dt / steps,
                            kernel=getattr(be, "kernel", lambda p: "")(precision)))  # fmt: skip
    return out


def decode_rows_main(args) -> None:
    import torch

    from polygpt import inference

    torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    be = args.backend
    lms = {p: inference.load(args.checkpoint, backend=be, precision=p) for p in precisions}
    rows_list = [int(r) for r in args.rows.split(",")]
    got = []
    for r in range(args.rounds):
        order = dict(reversed(lms.items())) if r % 2 else lms
        for rec in decode_rows_rates(order, rows_list, args.steps):
            rec.update(round=r + 1, load=_load(), threads=args.threads)
            got.append(rec)
            if args.json:
                print(json.dumps(rec), flush=True)
    if args.json:
        return
    print(f"{lms[precisions[0]].backend.describe()}; threads {args.threads}")
    for p in precisions:
        for n in rows_list:
            ts = [g["tokens_per_s"] for g in got if g["precision"] == p and g["rows"] == n]
            print(f"{p:>5} {n:>3} rows: median {statistics.median(ts):8.1f} tokens/s "
                  f"({min(ts):.1f}-{max(ts):.1f}, {len(ts)} rounds)")  # fmt: skip
    print(f"load average after {_load()}")


def report(name: str, unit: str, rows: list[tuple[float, float]], higher_is_better: bool) -> None:
    print(f"\n{name}: {'round':>6}{'nanoGPT':>12}{'polygpt':>12}{'speed-up':>10}  ({unit})")
    ratios = []
    for i, (n, p) in enumerate(rows, 1):
        ratio = p / n if higher_is_better else n / p
        ratios.append(ratio)
        print(f"{'':{len(name) + 2}}{i:>6}{n:12.1f}{p:12.1f}{ratio:9.2f}x")
    med_n = statistics.median(n for n, _ in rows)
    med_p = statistics.median(p for _, p in rows)
    print(
        f"{'':{len(name) + 2}}{'median':>6}{med_n:12.1f}{med_p:12.1f}"
        f"{statistics.median(ratios):9.2f}x  (median of the rounds' ratios)"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    tr = sub.add_parser("train", help="polygpt train vs nanoGPT's train.py loop")
    tr.add_argument("overrides", nargs="*", help="config overrides, key=value")
    tr.add_argument("--config", default="configs/shakespeare_char.toml")
    tr.add_argument(
        "--cold", action="store_true", help="also time polygpt with an empty inductor cache"
    )
    tr.add_argument("--out", help="also write every round's figures to this JSON file")
    de = sub.add_parser("decode", help="batch-1 decode: polygpt sample vs nanoGPT's method")
    de.add_argument("checkpoint")
    de.add_argument("--short", type=int, default=500, help="tokens of the short run")
    de.add_argument("--long", type=int, default=10_500, help="tokens of the long run")
    ro = sub.add_parser("rows", help="the engine's decode step: N rows against 1")
    ro.add_argument("checkpoint")
    ro.add_argument("--backend", default="torch")
    ro.add_argument("--rows", type=int, default=16)
    dr = sub.add_parser("decode-rows", help="decode steps alone: tokens/s per precision and rows")
    dr.add_argument("checkpoint")
    dr.add_argument("--backend", default="torch")
    dr.add_argument("--precisions", default="fp32,int8,int4")
    dr.add_argument("--rows", default="1,16")
    dr.add_argument("--steps", type=int, default=64, help="decode steps timed per measurement")
    dr.add_argument("--threads", type=int, default=2)
    dr.add_argument("--json", action="store_true", help="one JSON line per measurement")
    for p in (de, ro, dr):
        p.add_argument("--rounds", type=int, default=3)
    tr.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if args.what == "decode-rows":
        return decode_rows_main(args)
    if args.what == "rows":
        from polygpt import inference

        lm = inference.load(args.checkpoint, backend=args.backend, device="cpu")
        print(f"load average {_load()}; {lm.backend.describe()}")
        rows_round(lm, args.rows, 50)  # warm-up: allocations, MLX's traces
        res = []
        for r in range(args.rounds):
            res.append(rows_round(lm, args.rows))
            print(f"round {r + 1}: 1 row {res[-1][0]:.3f} ms, {args.rows} rows {res[-1][1]:.3f} ms")
        ratios = [b / a for a, b in res]
        print(
            f"median: 1 row {statistics.median(a for a, _ in res):.3f} ms, {args.rows} rows "
            f"{statistics.median(b for _, b in res):.3f} ms, ratio {statistics.median(ratios):.2f}"
            f" (median of the rounds'); load average after {_load()}"
        )
        return
    import torch  # only for the thread count it reports (the runs are subprocesses)

    print(f"load average {_load()}; {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        if args.what == "train":
            res = train_rounds(args.config, args.overrides, Path(d), args.rounds, args.cold)
            if args.out:
                _write_train(args, res)
        else:
            for r in range(args.rounds):
                rows.append(decode_round(args.checkpoint, args.short, args.long, r))
                print(f"round {r + 1}: {rows[-1][0]:.1f} / {rows[-1][1]:.1f}; load {_load()}")
            report("decode b1", "tokens/s, difference method", rows, higher_is_better=True)
    print(f"load average after {_load()}")


if __name__ == "__main__":
    main()
