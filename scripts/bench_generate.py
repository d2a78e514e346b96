"""Decode speed: polygpt's KV-cache engine against nanoGPT's method, on the same checkpoint.

nanoGPT's `generate` crops the sequence to the last block_size tokens and runs a full forward
pass for every new token; `polygpt.generate.uncached_generate` is exactly that loop (with the
same sampler), so the two differ only in the engine. For each backend this measures, end to end
(prompt prefill, window re-prefills and sampling included), tokens per second of:

    nanogpt b1     uncached_generate, one stream
    cached b1      generate, one stream
    cached bN      generate, N streams as one batch (aggregate tokens/s)

with a warm-up run first and the median of --repeats runs, the methods interleaved within each
repeat so machine load drifts hit them alike. Speed-ups are against `nanogpt b1`. Besides wall
time it reports CPU time of the process: on a shared machine that is what a run would take with
a core to itself (torch here runs one thread; MLX's CPU threads are counted too).

    .venv/bin/python scripts/bench_generate.py weights/ref_torch
    .venv/bin/python scripts/bench_generate.py weights/ref_torch --backends torch --precision int8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from polygpt import inference
from polygpt.backends import available_backends
from polygpt.generate import GenerationConfig, generate, uncached_generate


def _time(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process). On a machine shared with other work
    the CPU time is what the run would take alone (if it stays on one core)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def bench_backend(ckpt: str, backend: str, args) -> dict:
    lm = inference.load(ckpt, backend=backend, device=args.device, precision=args.precision)
    be, model, block = lm.backend, lm.model, lm.spec.block_size
    prompt = lm.encode(args.prompt)
    cfg = GenerationConfig(max_new_tokens=args.tokens, temperature=args.temperature, seed=args.seed)
    B = args.batch
    runs = {
        "nanogpt b1": (1, lambda c: uncached_generate(be, model, block, [prompt], c)),
        "cached b1": (1, lambda c: generate(be, model, block, [prompt], c)),
        f"cached b{B}": (B, lambda c: generate(be, model, block, [prompt] * B, c)),
    }
    if args.nanogpt_batch:
        runs[f"nanogpt b{B}"] = (B, lambda c: uncached_generate(be, model, block, [prompt] * B, c))
    warm = GenerationConfig(max_new_tokens=min(args.tokens, 2 * block), temperature=0.8)
    for _, fn in runs.values():  # warm-up: allocators, kernels, compiled graphs
        fn(warm)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, (_, fn) in runs.items():
            times[name].append(_time(lambda fn=fn: (fn(cfg), be.synchronize())))
    out = {
        "backend": backend,
        "describe": be.describe(),
        "precision": args.precision,
        "results": {},
    }
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    for name, (rows, _) in runs.items():
        tps, cpu_tps = rows * args.tokens / wall[name], rows * args.tokens / cpu[name]
        out["results"][name] = {
            "tokens_per_s": tps,
            "speedup_vs_nanogpt_b1": tps / (args.tokens / wall["nanogpt b1"]),
            "cpu_tokens_per_s": cpu_tps,
            "cpu_speedup_vs_nanogpt_b1": cpu_tps / (args.tokens / cpu["nanogpt b1"]),
            "median_s": wall[name],
            "min_s": min(w for w, _ in times[name]),
            "max_s": max(w for w, _ in times[name]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default="weights/ref_torch")
    ap.add_argument("--backends", default=",".join(available_backends()))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--tokens", type=int, default=500, help="new tokens per stream")
    ap.add_argument("--batch", type=int, default=64, help="streams in the batched run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for nanoGPT's method (0: torch's default); polygpt's "
        "generation runs 1 thread on CPU (torch_backend/threads.py), so 1 compares like for like",
    )
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--prompt", default="\n")
    ap.add_argument(
        "--nanogpt-batch",
        action="store_true",
        help="also time nanoGPT's method on the batch (slow)",
    )
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    if args.threads and "torch" in args.backends:
        import torch

        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"{args.checkpoint}: {args.tokens} new tokens per stream, {args.precision}, "
        f"median of {args.repeats}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    results = []
    for name in args.backends.split(","):
        r = bench_backend(args.checkpoint, name, args)
        results.append(r)
        d = r["describe"]
        print(
            f"\n{name} ({d['framework']}, {d['device']}, threads {d['threads']}, BLAS {d['blas']})"
        )
        print(
            f"  {'method':<14}{'tokens/s':>10}{'vs nanogpt b1':>15}{'spread (s)':>16}"
            f"{'CPU tokens/s':>14}{'vs nanogpt':>12}"
        )
        for method, v in r["results"].items():
            spread = f"{v['min_s']:.3f}-{v['max_s']:.3f}"
            print(
                f"  {method:<14}{v['tokens_per_s']:>10,.0f}{v['speedup_vs_nanogpt_b1']:>14.1f}x"
                f"{spread:>16}{v['cpu_tokens_per_s']:>14,.0f}"
                f"{v['cpu_speedup_vs_nanogpt_b1']:>11.1f}x"
            )
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
