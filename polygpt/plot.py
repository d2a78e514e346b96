"""Charts (matplotlib, headless): loss curves and perplexity vs iterations/size of training
runs (`polygpt bench`'s charts: bench/charts.py).

Loss curves come from each run's `metrics.jsonl` (written by the training loop); perplexity
comes from the full-split evaluation recorded in the run's config.json (`polygpt eval --save`,
which the sweep runs), falling back to exp(val loss estimate) with a note in the legend.
"""

from __future__ import annotations

import math
from pathlib import Path

from polygpt import checkpoints, metrics_log
from polygpt.errors import PolygptError

KINDS = ("loss", "ppl-iters", "ppl-params")


def pyplot():
    try:  # matplotlib is the optional [plot] extra: imported only to draw
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PolygptError("plotting needs matplotlib: pip install 'polygpt[plot]'") from None
    return plt


def _label(run: Path) -> str:
    return run.name


def _perplexity(ckpt: checkpoints.Checkpoint) -> tuple[float, bool]:
    """(perplexity, exact): the full-split eval when recorded, else exp(val loss estimate)."""
    m = ckpt.config.get("metrics", {})
    if isinstance(m.get("eval_val"), dict) and "perplexity" in m["eval_val"]:
        return float(m["eval_val"]["perplexity"]), True
    if "val_loss" in m:
        return math.exp(m["val_loss"]), False
    raise PolygptError(f"{ckpt.path} has no validation metrics to plot")


def _has(row: dict, event: str, *keys: str) -> bool:
    return row.get("event") == event and all(
        isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool) for k in keys
    )


def plot_losses(runs: list[Path], out: Path, title: str | None = None) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        rows = metrics_log.read(run)
        color = f"C{i % 10}"
        # rows another program (or a bad edit) wrote without these numbers are skipped
        train = [(r["step"], r["loss"]) for r in rows if _has(r, "train", "step", "loss")]
        evals = [r for r in rows if _has(r, "eval", "step", "train_loss", "val_loss")]
        if not train and not evals:
            raise PolygptError(f"{run} has no losses in {checkpoints.METRICS_FILE} to plot")
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.25, lw=0.8)
        if evals:
            steps = [r["step"] for r in evals]
            ax.plot(
                steps,
                [r["train_loss"] for r in evals],
                color=color,
                ls="--",
                marker=".",
                label=f"{_label(run)} train",
            )
            ax.plot(
                steps,
                [r["val_loss"] for r in evals],
                color=color,
                marker="o",
                ms=3,
                label=f"{_label(run)} val",
            )
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "training and validation loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # evaluations were plotted
        ax.legend(fontsize=8)
    return _save(fig, plt, out)


def plot_perplexity(
    runs: list[Path], out: Path, x: str = "iters", title: str | None = None
) -> Path:
    plt = pyplot()
    pts = []
    for run in runs:
        ck = checkpoints.read(run)
        ppl, exact = _perplexity(ck)
        xv = ck.step if x == "iters" else ck.spec.num_params()
        pts.append((xv, ppl, exact, run))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for xv, ppl, exact, run in sorted(pts, key=lambda p: p[0]):
        ax.scatter([xv], [ppl], marker="o" if exact else "x", s=40)
        ax.annotate(
            f"{_label(run)}\n{ppl:.2f}",
            (xv, ppl),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    xs = sorted(pts, key=lambda p: p[0])
    ax.plot([p[0] for p in xs], [p[1] for p in xs], color="gray", lw=0.8, alpha=0.6)
    if x == "params":
        ax.set_xscale("log")
        ax.set_xlabel("parameters (non-embedding)")
    else:
        ax.set_xlabel("training iterations")
    ax.set_ylabel("validation perplexity (full split)")
    if not all(p[2] for p in pts):
        ax.text(
            0.01,
            0.01,
            "x: exp(val loss estimate), no full-split eval recorded",
            transform=ax.transAxes,
            fontsize=7,
        )
    ax.set_title(title or f"perplexity vs {'iterations' if x == 'iters' else 'model size'}")
    ax.grid(alpha=0.3)
    return _save(fig, plt, out)


def _save(fig, plt, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot(
    runs: list[str | Path], out: str | Path, kind: str = "loss", title: str | None = None
) -> Path:
    if kind not in KINDS:
        raise PolygptError(f"unknown plot kind {kind!r} (choose from {', '.join(KINDS)})")
    paths = [Path(r) for r in runs]
    for p in paths:
        if not p.is_dir():
            raise PolygptError(f"run directory {p} does not exist")
    if kind == "loss":
        return plot_losses(paths, Path(out), title)
    return plot_perplexity(paths, Path(out), "iters" if kind == "ppl-iters" else "params", title)
