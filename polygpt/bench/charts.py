"""`polygpt bench`'s charts (matplotlib, headless): tokens/s by configuration and perplexity
against saved size."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from polygpt.backends.base import PRECISIONS, known_backends
from polygpt.bench.measure import BenchResult
from polygpt.plot import pyplot

_NO_RATE = SimpleNamespace(median=0)


def bench_charts(result: BenchResult, out: Path) -> list[Path]:
    """tokens_per_s.png (decode/prefill rates by configuration, log scale) and
    ppl_vs_size.png (perplexity against saved size)."""
    plt = pyplot()
    ok = [r for r in result.results if r.status == "ok"]
    paths = [out / "tokens_per_s.png", out / "ppl_vs_size.png"]
    for draw, path in zip((_rates, _ppl_vs_size), paths):
        fig = draw(plt, ok, result)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return paths


def _rates(plt, ok: list, result: BenchResult):
    big = max(result.settings.batch_sizes)
    series = [
        ("KV decode b1", "decode_kv", "b1"),
        ("no-cache b1", "decode_nocache", "b1"),
        (f"KV decode b{big}", "decode_kv", f"b{big}"),
        (f"no-cache b{big}", "decode_nocache", f"b{big}"),
        (f"prefill b{big}", "prefill", f"b{big}"),
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(ok) + 2), 4.5))
    width = 0.8 / len(series)
    x = np.arange(len(ok))
    for i, (name, group, key) in enumerate(series):
        vals = [(getattr(r, group).get(key) or _NO_RATE).median for r in ok]
        ax.bar(x + (i - len(series) / 2 + 0.5) * width, vals, width, label=name)
    tr = [r.train.median if r.train else 0 for r in ok]
    if any(tr):
        ax.scatter(x, tr, marker="D", color="black", zorder=3, label="training")
    ax.set_xticks(x, [r.name for r in ok], rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log)")
    ax.set_title("polygpt bench: tokens/s by configuration")
    ax.legend(fontsize=8)
    return fig


def _ppl_vs_size(plt, ok: list, result: BenchResult):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = dict(zip(known_backends(), "os^D"))
    colors = dict(zip(PRECISIONS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    stacked: dict[tuple, int] = {}  # labels at the same spot go one above the other
    for r in ok:
        if r.ppl is None or not r.size_mb:
            continue
        ppl = r.ppl.perplexity
        marker, color = markers.get(r.backend, "^"), colors.get(r.precision)
        ax.scatter(r.size_mb, ppl, marker=marker, color=color, zorder=3)
        spot = (round(r.size_mb, 1), round(ppl, 2))
        k = stacked[spot] = stacked.get(spot, -1) + 1
        ax.annotate(
            r.name, (r.size_mb, ppl), fontsize=7, xytext=(4, 3 + 9 * k), textcoords="offset points"
        )
    ax.set_xlabel("saved model size (MB)")
    ax.set_ylabel(f"perplexity ({result.settings.ppl_tokens:,} val tokens)")
    ax.set_title("perplexity vs size")
    return fig
