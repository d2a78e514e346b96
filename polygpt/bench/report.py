"""`polygpt bench`, reporting: results.json, results.csv (one row per configuration),
results.md (the table, also printed) and the charts (charts.py)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from polygpt.bench import charts, limits
from polygpt.bench.measure import PROBE_TOKENS, BenchResult, Rate, Row
from polygpt.spec import ModelSpec


def median(row: Row, group: str, key: str) -> float | None:
    """The median rate of row.<group>[key] (e.g. "decode_kv", "b1"), or None."""
    v = getattr(row, group).get(key)
    return v.median if v is not None else None


def flat_row(row: Row, batch_sizes: list[int]) -> dict:
    """One CSV row: medians (tokens/s) plus min/max of each measurement."""
    d = row.describe or {}
    flat = {
        "backend": row.backend,
        "device": row.device,
        "precision": row.precision,
        "status": row.status,
        "reason": row.reason or "",
        "device_name": d.get("device_name", ""),
        "framework": d.get("framework", ""),
        "blas": d.get("blas", ""),
        "threads": d.get("threads", ""),
        "kernel": row.kernel,
        "size_mb": row.size_mb,
        "peak_rss_mb": row.memory.get("peak_rss_mb"),
    }
    for group in ("prefill", "decode_kv", "decode_nocache"):
        for B in batch_sizes:
            v = getattr(row, group).get(f"b{B}")
            for stat in ("median", "min", "max"):
                flat[f"{group}_b{B}_{stat}"] = getattr(v, stat) if v else None
    tr = row.train
    flat["train_tokens_per_s"] = tr.median if tr else None
    flat["train_min"], flat["train_max"] = (tr.min, tr.max) if tr else (None, None)
    flat["ppl"] = row.ppl.perplexity if row.ppl else None
    flat["ppl_tokens"] = row.ppl.tokens if row.ppl else None
    flat["ppl_full"] = row.ppl_full.perplexity if row.ppl_full else None
    return flat


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def _rate_cell(v: Rate | None) -> str:
    if v is None:
        return "-"
    if v.probe:
        return f"{v.median:,.0f}*"
    return f"{v.median:,.0f} ±{v.spread_pct:.0f}%" if v.n > 1 else f"{v.median:,.0f}"


def markdown(result: BenchResult) -> str:
    """The results table (tokens/s medians, ± the spread of the repeats) plus skipped rows."""
    st = result.settings
    env = result.environment
    ck = result.checkpoint
    lines = [
        f"polygpt bench: `{ck['path']}` ({ck['params'] / 1e6:.2f}M parameters, step "
        f"{ck['step']}) on {env['cpu']}, {env['logical_cpus']} logical CPUs, {env['os']}, "
        f"Python {env['python']}; threads: {env.get('threads', '?')}",
        "",
        *_table(result),
        "",
        "Rates are tokens/s (median of repeats, ± (max - min) / median). Decode: "
        f"{st.new_tokens} new tokens per stream, sampling and window "
        "slides included; bN = N streams as one batch (aggregate). ppl: first "
        f"{st.ppl_tokens:,} validation tokens, non-overlapping windows. "
        f"* = the rate of a {PROBE_TOKENS}-token probe: a full run would not fit the time budget.",
    ]
    notes = [r for r in result.results if r.status != "ok" or r.size_note]
    if notes:
        lines.append("")
        for r in notes:
            what = r.status if r.status != "ok" else "note"
            lines.append(f"- {r.name}: {what}: {r.reason or r.size_note}")
    lines += limit_lines(result)
    return "\n".join(lines + _machine_lines(result)) + "\n"


def _table(result: BenchResult) -> list[str]:
    """The results table's lines: one row per configuration that ran."""
    bs = result.settings.batch_sizes
    big = max(bs)
    head = ["backend", "device", "precision", "size MB", "peak RSS MB", "prefill b1"]
    if big != 1:  # --quick measures batch 1 only: no second prefill column
        head.append(f"prefill b{big}")
    head += [f"KV decode b{B}" for B in bs]
    head += [f"no-cache b{B}" for B in bs]
    head += ["KV speed-up b1", "train tok/s", "ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in result.results:
        if r.status != "ok":
            continue
        kv1, nc1 = median(r, "decode_kv", "b1"), median(r, "decode_nocache", "b1")
        cells = [
            r.backend,
            r.device,
            r.precision,
            _fmt(r.size_mb, 2),
            _fmt(r.memory.get("peak_rss_mb")),
            _rate_cell(r.prefill.get("b1")),
            *([_rate_cell(r.prefill.get(f"b{big}"))] if big != 1 else []),
        ]
        cells += [_rate_cell(r.decode_kv.get(f"b{B}")) for B in bs]
        cells += [_rate_cell(r.decode_nocache.get(f"b{B}")) for B in bs]
        cells.append(f"{kv1 / nc1:.1f}x" if kv1 and nc1 else "-")
        cells.append(_rate_cell(r.train))
        cells.append(_ppl_cell(r, result.settings.ppl_tokens))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ppl_cell(r, ppl_tokens: int) -> str:
    n = r.ppl.tokens if r.ppl else None
    short = n is not None and n + 1 < ppl_tokens
    return (
        _fmt(r.ppl.perplexity if r.ppl else None, 4)
        + (f" ({n + 1:,} tok)" if short else "")
        + (f" (full {r.ppl_full.perplexity:.4f})" if r.ppl_full else "")
    )


def _machine_lines(result: BenchResult) -> list[str]:
    """The matmul kernels and, per backend and device, framework, device, BLAS and threads."""
    ok = [r for r in result.results if r.status == "ok"]
    lines = []
    kernels = [f"{r.name}: {r.kernel}" for r in ok if r.kernel]
    if kernels:
        lines += ["", "- matmul kernels: " + "; ".join(kernels)]
    descs: dict[tuple[str, str], dict] = {}
    for r in ok:
        descs.setdefault((r.backend, r.device), r.describe or {})
    if descs:
        lines.append("")
        for (b, dev), d in descs.items():
            lines.append(
                f"- {b}/{dev}: {d.get('framework', '?')}, {d.get('device_name', '?')}, "
                f"BLAS {d.get('blas', '?')}, threads {d.get('threads', '?')}"
            )
    return lines


def limit_lines(result: BenchResult) -> list[str]:
    """Each configuration's batch-1 rates as fractions of the machine's ceilings (limits.py)."""
    lim = result.limits
    if not lim:
        return []
    spec = ModelSpec.from_dict(result.checkpoint["spec"])
    per_tok = limits.prefill_flops_per_token(spec, spec.block_size)
    out = [
        "",
        f"Machine ceilings (measured now, {lim['threads']} threads): memory read "
        f"{lim['read_gb_s']:.1f} GB/s, float32 matmul {lim['matmul_gflop_s']:.0f} GFLOP/s "
        "(NumPy's BLAS).",
    ]
    for r in result.results:
        if r.status != "ok":
            continue
        parts = []
        wmb = r.memory.get("weights_mb")
        kv1 = median(r, "decode_kv", "b1")
        if kv1 and wmb:
            bound = limits.decode_bound(wmb * 1e6, lim["read_gb_s"])
            parts.append(
                f"KV decode b1 {kv1:,.1f} tok/s = {100 * kv1 / bound:.0f}% of the bandwidth "
                f"bound {bound:,.1f} ({wmb:,.0f} MB of weights per token)"
            )
        pf1 = median(r, "prefill", "b1")
        if pf1:
            frac = pf1 * per_tok / (lim["matmul_gflop_s"] * 1e9)
            parts.append(f"prefill b1 = {100 * frac:.0f}% of the matmul peak")
        rss = r.memory.get("peak_rss_mb")
        if rss and wmb:
            parts.append(f"peak RSS {rss / wmb:.2f}x the weights")
        if parts:
            out.append(f"- {r.name}: " + "; ".join(parts))
    return out


def write_outputs(result: BenchResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    flats = [flat_row(r, result.settings.batch_sizes) for r in result.results]
    with open(out / "results.csv", "w", newline="") as f:
        fields = list(flats[0]) if flats else ["backend", "device", "precision", "status"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for fr in flats:
            w.writerow({k: "" if v is None else v for k, v in fr.items()})
    (out / "results.md").write_text(markdown(result))
    charts.bench_charts(result, out)
