"""Tables for docs/EXPERIMENTS.md from what `make experiments` measured.

    .venv/bin/python scripts/experiments_report.py [--out docs/experiments/report.md]

Reads the sweep's results (docs/experiments/results.json), the seed sweep
(docs/experiments/seeds/results.json), nanoGPT's seeds (docs/experiments/nanogpt_seeds.json,
from scripts/nanogpt_seeds.py), the last-token perplexities (docs/experiments/lasttoken/*.json,
from `polygpt eval --method last-token --json`) and the inference table's `polygpt bench` run
(docs/experiments/inference.json), and writes the Markdown tables: the sweep against the blog,
the seed spread (mean ± sd) and the inference table. A missing input leaves its rows out and
says so; nothing here trains or evaluates.
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
        "(sliding) | ppl, last-token (first 50k val) | ms/iter (load) | blog: train / val / ppl |",
        "|" + "---|" * 10,
    ]
    for r in results:
        lt = _load(lasttoken / f"{r['name']}-50k.json")
        load = r.get("load_avg_1_5_15")
        ms = f"{r['ms_per_iter']:.1f}" + (f" ({load[0]:.1f})" if load else "")
        b = BLOG.get(r["name"], {})
        blog = " / ".join(
            f"{b[k]:.2f}" if isinstance(b.get(k), float) else "–" for k in ("train", "val", "ppl")
        )
        if "params" in b:
            blog = f"{blog} ({b['params']})"
        rows.append(
            f"| {r['name']} | {r['backend']} | {r['params_non_embedding']:,} | {r['max_iters']} "
            f"| {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} "
            f"| {lt['perplexity']:.3f} | {ms} | {blog} |"
            if lt
            else f"| {r['name']} | {r['backend']} | {r['params_non_embedding']:,} "
            f"| {r['max_iters']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} "
            f"| {r['val_ppl']:.3f} | (not measured) | {ms} | {blog} |"
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


# The blog's inference table (6.31M model, 4000 iterations): perplexity on 50k val tokens, its
# last-token method. Sizes and speeds are only charted there.
BLOG_INFERENCE = {"fp32": 4.111, "fp16": 4.113, "int8": 4.116}


def inference_table(benches: list[dict] | None, lasttoken: Path) -> list[str]:
    """`benches`: the `polygpt bench` runs of the table (results.json each), in order."""
    if not benches:
        return ["(not measured: `make experiments` runs `polygpt bench` on 6.3M-4000)"]
    rows = [
        "| backend | precision | size on disk | weights in memory | ppl, whole val (64-char "
        "windows) | ppl, first N val tokens (N) | ppl, first 50k (last-token) | decode b1 "
        "tokens/s | decode b8 tokens/s | prefill b8 tokens/s | the blog: ppl (50k, last-token) |",
        "|" + "---|" * 11,
    ]
    for r in (r for bench in benches for r in bench["results"]):
        if r["status"] == "skipped" and r.get("scope") == "device":
            continue  # a device this machine does not have (cuda, mps, gpu)
        if r["status"] != "ok":
            rows.append(
                f"| {r['backend']} | {r['precision']} | {r.get('reason') or r['status']} "
                "| | | | | | | | |"
            )
            continue
        full = (r.get("ppl_full") or {}).get("perplexity")
        lt = _load(lasttoken / f"6.3M-4000-{r['backend']}-{r['precision']}-50k.json")

        def rate(group: str, b: str, r=r) -> str:
            v = (r.get(group) or {}).get(b)
            return f"{v['median']:,.0f}" if v else "–"

        blog = BLOG_INFERENCE.get(r["precision"]) if r["backend"] == "torch" else None
        mem = r.get("memory") or {}
        sub = r.get("ppl") or {}
        part = f"{_num(sub.get('perplexity'), 4)} ({sub.get('tokens', 0):,})" if sub else "–"
        rows.append(
            f"| {r['backend']} | {r['precision']} | {_num(r.get('size_mb'), 2, ' MB')} "
            f"| {_num(mem.get('weights_mb'), 2, ' MB')} | {_num(full, 4)} | {part} "
            f"| {_num(lt and lt['perplexity'], 4)} | {rate('decode_kv', 'b1')} "
            f"| {rate('decode_kv', 'b8')} | {rate('prefill', 'b8')} | {blog or '–'} |"
        )
    for bench in benches:
        env, st = bench.get("environment", {}), bench.get("settings", {})
        rows.append(
            f"\n`polygpt bench` of {', '.join(sorted({r['backend'] for r in bench['results']}))} "
            f"({', '.join(st.get('precisions') or [])}): {bench.get('wall_s', 0) / 60:.1f} min, "
            f"load average at its start {env.get('load_average')}, "
            f"perplexity on {st.get('ppl_tokens')} val tokens"
            + (" and the whole split" if st.get("full_ppl") else "")
            + "."
        )
    return rows


def _num(v, digits: int, unit: str = "") -> str:
    return "–" if v is None else f"{v:,.{digits}f}{unit}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="docs/experiments/results.json")
    ap.add_argument("--seeds", default="docs/experiments/seeds/results.json")
    ap.add_argument("--nanogpt", default="docs/experiments/nanogpt_seeds.json")
    ap.add_argument("--lasttoken", default="docs/experiments/lasttoken")
    ap.add_argument("--inference", default="docs/experiments/inference.json")
    ap.add_argument("--out", default="docs/experiments/report.md")
    a = ap.parse_args()
    sweep = _load(Path(a.results)) or []
    seeds = _load(Path(a.seeds)) or []
    nano = _load(Path(a.nanogpt)) or []
    lines = ["# Experiments: the tables (scripts/experiments_report.py)", ""]
    lines += ["## The sweep against the blog", ""] + sweep_table(sweep, Path(a.lasttoken))
    lines += ["", "## Seed spread (reference config, 2000 iterations)", ""]
    lines += seed_table(sweep, seeds, nano)
    lines += ["", "## The inference table (6.3M-4000)", ""]
    lines += inference_table(_load(Path(a.inference)), Path(a.lasttoken))
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
