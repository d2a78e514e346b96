"""Side-by-side timing of perplexity methods on one checkpoint, per backend.

Scores the whole split (or --max-tokens) with batched sliding windows (stride block/2 by
default, and the non-overlapping stride == block) and with the reference experiment's
last-token method (one window per token), interleaving the runs so load drifts on a shared
machine hit every method alike, and reports medians and the speed-up in tokens/s.

The last-token method costs one forward per token whatever the text, so on a loaded machine
`--last-token-tokens N` times it on the first N tokens only (its tokens/s then stands for the
whole split; the table says how many tokens each row scored).

    .venv/bin/python scripts/bench_eval.py weights/ref_torch --backends torch,mlx --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from polygpt import checkpoints, data, evaluate
from polygpt.backends import get_backend
from polygpt.errors import PolygptError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--backends", default="torch,mlx")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--split", default="val")
    ap.add_argument("--stride", type=int, default=None, help="sliding stride [block/2]")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of every method")
    ap.add_argument(
        "--last-token-tokens",
        type=int,
        default=None,
        help="time last-token on the first N tokens only [all]",
    )
    ap.add_argument("--json", dest="json_out", default=None, help="also write results here")
    args = ap.parse_args(argv)

    ckpt = checkpoints.read(args.checkpoint)
    block = ckpt.spec.block_size
    stride = args.stride or block // 2
    tokens = data.load_split(ckpt.config["run"]["data"]["dir"], args.split)
    if args.max_tokens:
        tokens = tokens[: args.max_tokens]
    methods = {
        f"sliding, stride {stride}": dict(method="sliding", stride=stride),
        f"sliding, stride {block}": dict(method="sliding", stride=block),
        "last-token": dict(method="last-token"),
    }
    rows = []
    print(
        f"{args.checkpoint}: {ckpt.spec.num_params():,} params, block {block}, "
        f"{len(tokens) - 1:,} targets of {args.split}; load {os.getloadavg()[0]:.2f}"
    )
    for name in args.backends.split(","):
        try:
            be = get_backend(name, args.device)
            model = be.load_model(ckpt.model, "fp32")
        except (PolygptError, ImportError, AttributeError) as e:
            print(f"{name}: skipped ({e})")
            continue
        run = lambda kw, toks, be=be, model=model: evaluate.perplexity(  # noqa: E731
            be,
            model,
            toks,
            block,
            batch_size=args.batch_size,
            vocab_size=ckpt.spec.vocab_size,
            char_level=True,
            **kw,
        )
        for kw in methods.values():  # warm-up: allocator, kernels, lazy init
            run(kw, tokens[: 8 * block])
        lt_tokens = tokens[: args.last_token_tokens] if args.last_token_tokens else tokens
        walls: dict[str, list[float]] = {m: [] for m in methods}
        res = {}
        for r in range(args.repeats):
            for m, kw in methods.items():
                res[m] = run(kw, lt_tokens if kw["method"] == "last-token" else tokens)
                walls[m].append(res[m].wall_s)
                print(
                    f"  {name} run {r + 1}: {m:<20} {res[m].wall_s:8.2f} s  "
                    f"ppl {res[m].perplexity:.4f}",
                    file=sys.stderr,
                )
        base = res["last-token"].tokens / statistics.median(walls["last-token"])  # tokens/s
        for m in methods:
            med = statistics.median(walls[m])
            tps = res[m].tokens / med
            rows.append(
                {
                    "backend": name,
                    "device": be.device,
                    "method": m,
                    "perplexity": res[m].perplexity,
                    "nll": res[m].nll,
                    "nll_se": res[m].nll_se,
                    "bits_per_char": res[m].bits_per_char,
                    "tokens": res[m].tokens,
                    "windows": res[m].n_windows,
                    "batch_size": res[m].batch_size,
                    "wall_s_median": med,
                    "wall_s_all": walls[m],
                    "tokens_per_s": tps,
                    "speedup_vs_last_token": tps / base,
                }
            )
    print()
    print(
        "| backend | method | tokens scored | perplexity | bits/char | windows "
        "| wall s (median) | tokens/s | × last-token |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} ({r['device']}) | {r['method']} | {r['tokens']:,} "
            f"| {r['perplexity']:.4f} "
            f"| {r['bits_per_char']:.4f} | {r['windows']:,} | {r['wall_s_median']:.2f} "
            f"| {r['tokens_per_s']:,.0f} | {r['speedup_vs_last_token']:.1f} |"
        )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
