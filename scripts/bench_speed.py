"""The speed goals, measured: polygpt against nanoGPT, and the engine's batch, interleaved rounds.

    .venv/bin/python scripts/bench_speed.py train [--rounds 3] [key=value overrides...]
    .venv/bin/python scripts/bench_speed.py decode CHECKPOINT [--rounds 3]
    .venv/bin/python scripts/bench_speed.py rows CHECKPOINT [--backend torch] [--rows 16]

train: per round, nanoGPT's train.py loop (scripts/nanogpt_seeds.py: its model, batches,
    AdamW and `estimate_loss` every eval_interval) then `polygpt train` of the same config with
    default settings, each timed as ms/iter over the span from the first to the last
    evaluation (the loop plus its evaluations); the speed-up is nanoGPT's / polygpt's.
decode: per round, batch-1 tokens/s by the difference method (a SHORT- and a LONG-token run,
    so start-up cancels): `polygpt sample --temperature 0.8 --top-k 200` through the CLI, and
    nanoGPT's method (`uncached_generate`: a full forward over the cropped context per token,
    same weights and sampler) in a subprocess; default threads both.
rows: the engine's decode step (`decode_rows`) for one row and for N rows at once, rows of
    different lengths (a server's batch), on the checkpoint's weights in this process; per round
    the median ms of 200 steps each, the ratio N rows / 1 row (the goal: <= 2).

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _polygpt(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [PY, "-c", "from polygpt.cli import main; main()", *args]
    return subprocess.run(cmd, env=ENV, check=True, **kw)


def _span_ms(times: list[float], iters: int) -> float:
    return 1000 * (times[-1] - times[0]) / iters


def train_round(cfg_path: str, overrides: list[str], tmp: Path, r: int) -> tuple[float, float]:
    """(nanoGPT ms/iter, polygpt ms/iter) for one round, in alternating order."""
    code = (
        "import json, sys; sys.path.insert(0, 'scripts');"
        "from nanogpt_seeds import config, data, run_seed;"
        f"cfg = config.load({cfg_path!r}, {overrides!r});"
        "splits = {s: data.load_split(cfg.data.dir, s) for s in ('train', 'val')};"
        f"r = run_seed(1337, cfg, splits, __import__('pathlib').Path({str(tmp / f'ng{r}')!r}));"
        "print(json.dumps([h['time'] for h in r['history']]), cfg.train.max_iters)"
    )

    def nano() -> float:
        out = (
            subprocess.run(
                [PY, "-c", code], env=ENV, cwd=ROOT, check=True, capture_output=True, text=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        times, iters = out.rsplit(" ", 1)
        return _span_ms(json.loads(times), int(iters))

    def poly() -> float:
        out = tmp / f"pg{r}"
        _polygpt(
            "train", cfg_path, *overrides, "--out", str(out), "--overwrite", "-q",
            cwd=ROOT, capture_output=True,
        )  # fmt: skip
        evals = [
            json.loads(line)
            for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in line
        ]
        return _span_ms([e["time"] for e in evals], evals[-1]["step"] - evals[0]["step"])

    if r % 2:
        p = poly()
        return nano(), p
    n = nano()
    return n, poly()


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
    de = sub.add_parser("decode", help="batch-1 decode: polygpt sample vs nanoGPT's method")
    de.add_argument("checkpoint")
    de.add_argument("--short", type=int, default=500, help="tokens of the short run")
    de.add_argument("--long", type=int, default=10_500, help="tokens of the long run")
    ro = sub.add_parser("rows", help="the engine's decode step: N rows against 1")
    ro.add_argument("checkpoint")
    ro.add_argument("--backend", default="torch")
    ro.add_argument("--rows", type=int, default=16)
    for p in (tr, de, ro):
        p.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
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
        for r in range(args.rounds):
            if args.what == "train":
                rows.append(train_round(args.config, args.overrides, Path(d), r))
            else:
                rows.append(decode_round(args.checkpoint, args.short, args.long, r))
            print(f"round {r + 1}: {rows[-1][0]:.1f} / {rows[-1][1]:.1f}; load {_load()}")
    if args.what == "train":
        report("training", "ms/iter, loop + evaluations", rows, higher_is_better=False)
    else:
        report("decode b1", "tokens/s, difference method", rows, higher_is_better=True)
    print(f"load average after {_load()}")


if __name__ == "__main__":
    main()
