"""Tables for docs/EXPERIMENTS.md from what `make experiments` measured.

    .venv/bin/python scripts/experiments_report.py [--out docs/experiments/report.md]

Reads the sweep's results (docs/experiments/results.json), the seed sweep
(docs/experiments/seeds/results.json), nanoGPT's seeds (weights/nanogpt_seeds/results.json,
from scripts/nanogpt_seeds.py) and the last-token perplexities (weights/lasttoken/*.json, from
`polygpt eval --method last-token --json`), and writes three Markdown tables: the sweep against
the blog, the seed spread (mean ± sd) and the two perplexity definitions side by side. A missing
input leaves its rows out and says so; nothing here trains or evaluates.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

# The blog's figures, where it gave a number (its text; its plots have no values).
BLOG = {
    "0.8M-2000": {"params": "802,944 (its count)"},
    "3.2M-2000": {"params": "3.16M"},
    "6.3M-2000": {"params": "6.31M"},
    "6.3M-4000": {"params": "6.31M", "train": 1.14, "val": 1.52, "ppl": 4.47},
}


def _load(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def sweep_table(results: list[dict], lasttoken: Path) -> list[str]:
    rows = [
        "| run | backend | params (non-emb) | iters | train loss | val loss | ppl, full split "
        "(sliding) | ppl, last-token (first 50k val) | ms/iter | blog: train / val / ppl |",
        "|" + "---|" * 10,
    ]
    for r in results:
        lt = _load(lasttoken / f"{r['name']}-50k.json")
        b = BLOG.get(r["name"], {})
        blog = " / ".join(
            f"{b[k]:.2f}" if isinstance(b.get(k), float) else "–" for k in ("train", "val", "ppl")
        )
        if "params" in b:
            blog = f"{blog} ({b['params']})"
        rows.append(
            f"| {r['name']} | {r['backend']} | {r['params_non_embedding']:,} | {r['max_iters']} "
            f"| {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} "
            f"| {lt['perplexity']:.3f} | {r['ms_per_iter']:.0f} | {blog} |"
            if lt
            else f"| {r['name']} | {r['backend']} | {r['params_non_embedding']:,} "
            f"| {r['max_iters']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} "
            f"| {r['val_ppl']:.3f} | (not measured) | {r['ms_per_iter']:.0f} | {blog} |"
        )
    full = _load(lasttoken / "6.3M-4000-full.json")
    if full:
        rows.append(
            f"\n6.3M-4000, last-token method on the whole val split ({full['tokens']:,} targets): "
            f"perplexity {full['perplexity']:.3f} (the blog: 4.47)."
        )
    return rows


def seed_table(sweep: list[dict], seeds: list[dict], nano: list[dict]) -> list[str]:
    by = {r["name"]: r for r in sweep}
    groups: dict[str, list[tuple[int, float, float]]] = {"polygpt torch": [], "polygpt MLX": []}
    for name, g, seed in (
        ("0.8M-2000", "polygpt torch", 1337),
        ("0.8M-2000-mlx", "polygpt MLX", 1337),
    ):
        if name in by:
            groups[g].append((seed, by[name]["val_loss"], math.log(by[name]["val_ppl"])))
    for r in seeds:
        g = "polygpt torch" if r["backend"] == "torch" else "polygpt MLX"
        seed = int(next(o for o in r["overrides"] if o.startswith("train.seed=")).split("=")[1])
        groups[g].append((seed, r["val_loss"], math.log(r["val_ppl"])))
    groups["nanoGPT (own init and batches)"] = [
        (r["seed"], r["val_loss"], r["val_nll_full"]) for r in nano
    ]
    rows = [
        "| recipe | seeds | val loss (loop's estimate), each | mean ± sd | full-split NLL, each "
        "| mean ± sd |",
        "|---|---|---|---|---|---|",
    ]
    for g, xs in groups.items():
        if not xs:
            rows.append(f"| {g} | – | (not run) | | | |")
            continue
        xs.sort()
        rows.append(
            f"| {g} | {', '.join(str(s) for s, _, _ in xs)} "
            f"| {', '.join(f'{v:.4f}' for _, v, _ in xs)} | {_mean_sd([v for _, v, _ in xs])} "
            f"| {', '.join(f'{n:.4f}' for _, _, n in xs)} | {_mean_sd([n for _, _, n in xs])} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="docs/experiments/results.json")
    ap.add_argument("--seeds", default="docs/experiments/seeds/results.json")
    ap.add_argument("--nanogpt", default="weights/nanogpt_seeds/results.json")
    ap.add_argument("--lasttoken", default="weights/lasttoken")
    ap.add_argument("--out", default="docs/experiments/report.md")
    a = ap.parse_args()
    sweep = _load(Path(a.results)) or []
    seeds = _load(Path(a.seeds)) or []
    nano = _load(Path(a.nanogpt)) or []
    lines = ["# Experiments: the tables (scripts/experiments_report.py)", ""]
    lines += ["## The sweep against the blog", ""] + sweep_table(sweep, Path(a.lasttoken))
    lines += ["", "## Seed spread (reference config, 2000 iterations)", ""]
    lines += seed_table(sweep, seeds, nano)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
