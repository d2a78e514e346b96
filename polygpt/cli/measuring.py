"""Commands that measure: `eval` (perplexity of a whole split), `bench` (speed, size, memory
and perplexity per backend x device x precision) and `bench-serve` (a server under load)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from polygpt import evaluate, hub
from polygpt.backends import available_backends
from polygpt.backends.base import PRECISIONS
from polygpt.bench import measure, report, serving
from polygpt.bench import run as bench
from polygpt.cli.app import (
    BACKEND,
    DATA,
    DEVICE,
    bar_wanted,
    csv_list,
    main,
    needs_serve_extra,
    precision_option,
)
from polygpt.cli.views import EvalBar, bench_line, eval_lines
from polygpt.errors import PolygptError


@main.command("eval")
@click.argument("checkpoint", type=click.Path())
@BACKEND
@DEVICE
@precision_option()
@click.option("--split", default="val", show_default=True, type=click.Choice(["val", "train"]))
@DATA
@click.option(
    "--method",
    default="sliding",
    show_default=True,
    type=click.Choice(["sliding", "last-token"]),
    help="last-token: one window per token (the reference method, slow).",
)
@click.option(
    "--stride", default=None, type=int, help="Sliding-window stride, 1..block_size [block_size/2]."
)
@click.option("--max-tokens", default=None, type=int, help="Only the first N tokens of the split.")
@click.option(
    "--batch-size", default=None, type=int, help="Windows per forward [about 8k positions]."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (no progress bar).")
@click.option("--save", is_flag=True, help="Record the result in the checkpoint's config.json.")
def eval_(
    checkpoint,
    backend,
    device,
    precision,
    split,
    data_dir,
    method,
    stride,
    max_tokens,
    batch_size,
    as_json,
    save,
) -> None:
    """Perplexity of a checkpoint over a whole split: every token scored once, with as much
    left context as the block allows (sliding windows, batched). CHECKPOINT may be a Hugging
    Face GPT-2 id (nanoGPT's eval_gpt2: `polygpt eval gpt2 --data data/shakespeare`)."""
    checkpoint = hub.checkpoint(checkpoint)
    bar = EvalBar() if bar_wanted(as_json) else None
    try:
        res = evaluate.evaluate_checkpoint(
            checkpoint,
            backend=backend,
            device=device or "auto",
            precision=precision,
            split=split,
            data_dir=data_dir,
            max_tokens=max_tokens,
            method=method,
            stride=stride,
            batch_size=batch_size,
            on_progress=bar,
        )
    finally:
        if bar is not None:
            bar.close()
    if save:
        evaluate.save_result(checkpoint, res)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
    else:
        for line in eval_lines(res):
            click.echo(line)


@main.command("bench")
@click.argument("checkpoint", type=click.Path())
@click.option("--backends", default="all", show_default=True, help="all, or e.g. torch,mlx.")
@click.option(
    "--devices",
    default="auto",
    show_default=True,
    help="auto (every device each backend knows), or e.g. cpu,cuda,mps,gpu.",
)
@click.option(
    "--precisions", default="all", show_default=True, help="all, or e.g. fp32,fp16,bf16,int8,int4."
)
@click.option(
    "--batch-sizes", default="1,8,64", show_default=True, help="Decode/prefill batch sizes."
)
@click.option("--out", "-o", default="bench_out", show_default=True, help="Output directory.")
@click.option("--full-ppl", is_flag=True, help="Also the perplexity of the whole val split.")
@click.option(
    "--ppl-tokens",
    default=50_000,
    show_default=True,
    type=int,
    help="Validation tokens for perplexity (0: skip).",
)
@click.option(
    "--new-tokens",
    default=128,
    show_default=True,
    type=int,
    help="Tokens generated per decode run.",
)
@click.option("--repeats", default=3, show_default=True, type=int, help="Timed runs per rate.")
@click.option(
    "--threads",
    default="auto",
    show_default=True,
    help="CPU threads per framework: N, 0 (the frameworks' defaults) or auto (the "
    "cores the machine's load leaves free; defaults when idle).",
)
@DATA
@click.option(
    "--quick",
    is_flag=True,
    help="Batch 1, KV decode, short runs, no training rate: GPT-2 124M in minutes on a CPU.",
)
def bench_(
    checkpoint,
    backends,
    devices,
    precisions,
    batch_sizes,
    out,
    full_ppl,
    ppl_tokens,
    new_tokens,
    repeats,
    threads,
    data_dir,
    quick,
) -> None:
    """Speed, size, memory and perplexity of CHECKPOINT on every backend x device x precision
    available here (each in its own process; what is missing is skipped, with the reason).

    \b
    polygpt bench weights/shakespeare_char
    polygpt bench weights/shakespeare_char --backends torch --precisions fp32,int8 --threads 1
    """
    try:
        n_threads = -1 if threads == "auto" else int(threads)
    except ValueError:
        raise PolygptError(f"--threads takes a number or auto, got {threads!r}") from None
    cfg = measure.BenchConfig(
        checkpoint=checkpoint,
        backends=None if backends == "all" else csv_list(backends, "backends"),
        devices=None if devices == "auto" else csv_list(devices, "devices"),
        precisions=list(PRECISIONS) if precisions == "all" else csv_list(precisions, "precisions"),
        batch_sizes=csv_list(batch_sizes, "batch-sizes", int),
        full_ppl=full_ppl,
        ppl_tokens=ppl_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        threads=n_threads,
        data_dir=data_dir,
    )
    if quick:
        cfg = bench.quick(cfg)
    result = bench.run_bench(cfg, out, on_event=bench_line)
    click.echo(report.markdown(result))
    click.echo(
        f"wrote {out}/results.json, results.csv, results.md, tokens_per_s.png, "
        f"ppl_vs_size.png ({result.wall_s:.0f}s)"
    )


@main.command("bench-serve")
@click.argument("checkpoint", type=click.Path())
@click.option("--backends", default="all", show_default=True, help="all, or e.g. torch,mlx.")
@DEVICE
@click.option("--clients", default=16, show_default=True, type=int, help="Concurrent clients.")
@click.option("--duration", default=20.0, show_default=True, type=float, help="Seconds per run.")
@click.option("--max-tokens", default=64, show_default=True, type=int, help="Per request.")
@click.option("--rounds", default=4, show_default=True, type=int, help="Alternations of 1 and N.")
@click.option("--n", "n", default=1, show_default=True, type=int, help="Choices per request.")
@click.option("--prompt", default="\n", show_default=True, help="Every request's prompt.")
@click.option("--url", default=None, help="Measure the OpenAI server running there instead.")
@precision_option()
@click.option(
    "--stagger",
    is_flag=True,
    help="Spread the clients out (their first requests of 1/N .. N/N of --max-tokens), so "
    "requests arrive one at a time rather than in a burst as each batch of them ends.",
)
@click.option("--json", "as_json", type=click.Path(dir_okay=False), help="Also write JSON here.")
def bench_serve(
    checkpoint, backends, device, clients, duration, max_tokens, rounds, n, prompt, url,
    precision, stagger, as_json,
):  # fmt: skip
    """Load-test `polygpt serve` on localhost: 1 client, then N concurrent, per backend."""
    needs_serve_extra()
    names = available_backends() if backends == "all" else backends.split(",")
    if min(clients, max_tokens, rounds, n) < 1 or duration <= 0:
        raise PolygptError("--clients, --duration, --max-tokens, --rounds, --n must be positive")
    click.echo(serving.HEADER)
    res = serving.bench_serve(
        checkpoint, names, clients, duration, max_tokens, prompt=prompt,
        device=device or "auto", rounds=rounds, n=n, url=url, precision=precision,
        stagger=stagger,
    )  # fmt: skip
    for line in serving.speedups(res):
        click.echo(line)
    if as_json:
        Path(as_json).write_text(serving.to_json(res) + "\n", encoding="utf-8")
