"""The `polygpt` command line: parse, call a workflow, format. No model code here.

Workflows (train, sweep, evaluate, bench) print nothing: they report typed events, and this
module turns them into lines and progress bars. A bar is drawn only when stderr is a terminal
(a log file or a pipe gets the lines alone).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from polygpt import (
    __version__,
    bench,
    bench_measure,
    bench_report,
    config,
    data,
    distributed,
    evaluate,
    inference,
    plot,
    quantize,
    serve_bench,
    sweep,
    weights,
)
from polygpt import convert as convert_mod
from polygpt import train as train_mod
from polygpt.backends import available_backends, get_backend, known_backends
from polygpt.backends.base import PRECISIONS
from polygpt.errors import PolygptError
from polygpt.generate import GenerationConfig


class _Group(click.Group):
    """Turns PolygptError (anything a user can cause) into one line on stderr and exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PolygptError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="polygpt")
def main() -> None:
    """polygpt: a GPT-2-style model, one spec, two frameworks (PyTorch and MLX), one
    safetensors checkpoint format."""


# ---- options shared by several commands: one definition each --------------------------------
BACKEND = click.option("--backend", "-b", default=None, help="torch or mlx.")
DEVICE = click.option(
    "--device", "-d", default=None, help="auto, cpu, cuda, mps (torch) or gpu (mlx) [auto]."
)
DATA = click.option(
    "--data", "data_dir", default=None, help="Prepared data directory [the checkpoint's data.dir]."
)
QUIET = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


def precision_option(choices: list[str] | None = None, **kw):
    """--precision; without `choices` the backend judges it (one line naming what it can do)."""
    return click.option(
        "--precision",
        "-p",
        default=None,
        type=click.Choice(choices) if choices else None,
        help="fp32, fp16, bf16, int8 (torch CPU; mlx), int4 (mlx) [the checkpoint's; torch "
        "computes an int8/int4 checkpoint in fp32].",
        **kw,
    )


def _bar_wanted(quiet: bool) -> bool:
    """Progress bars only on a terminal: in a file or pipe they are carriage-return frames."""
    return not quiet and sys.stderr.isatty()


class TrainView:
    """Draws training events: the lines on stdout, the progress bar on stderr."""

    def __init__(self, bar: bool):
        self.want_bar, self.bar = bar, None

    def __call__(self, ev) -> None:
        if isinstance(ev, train_mod.TrainStart):
            if ev.resumed:
                click.echo(f"resuming {ev.out} at step {ev.step} with {ev.backend} on {ev.device}")
            d = ev.describe
            click.echo(
                f"{ev.params / 1e6:.2f}M parameters (non-embedding; {ev.params_total:,} "
                f"total) | {d['framework']} on {d['device']} ({d['device_name']}) "
                f"| BLAS: {d['blas']} | {ev.processes}"
                + (
                    f" | {ev.dtype} step, {ev.eval_dtype} evaluation"
                    if ev.dtype != "fp32" or ev.eval_dtype != "fp32"
                    else ""
                )
            )
            if self.want_bar:
                self.bar = tqdm(
                    total=ev.max_iters, initial=ev.step, unit="it", dynamic_ncols=True, leave=True
                )
        elif isinstance(ev, train_mod.TrainStep):
            if self.bar is not None:
                if ev.loss is not None:
                    self.bar.set_postfix(loss=f"{ev.loss:.4f}", lr=f"{ev.lr:.2e}", refresh=False)
                self.bar.update(1)
        elif isinstance(ev, train_mod.Evaluated):
            msg = (
                f"step {ev.step}: train loss {ev.train_loss:.4f}, val loss "
                f"{ev.val_loss:.4f}, val ppl {ev.val_ppl:.3f}"
            )
            (self.bar.write if self.bar is not None else click.echo)(msg)
        elif isinstance(ev, train_mod.TrainEnd):
            self.close()
            r = ev.result
            if ev.timed_iters:
                click.echo(
                    f"trained {ev.timed_iters} iterations: {r.ms_per_iter:.1f} ms/iter, "
                    f"{r.tokens_per_s:,.0f} tokens/s (evaluation and the first step, "
                    f"{ev.first_step_s:.1f}s, excluded), {r.wall_s:.1f}s wall"
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _interrupted(e: train_mod.TrainInterrupted, resume_hint: str) -> str:
    """The one line Ctrl-C during training leaves: where it stopped, what is on disk."""
    try:
        held = f"{e.out} holds the checkpoint of step {weights_step(e.out)}; resume with: "
        held += resume_hint
    except PolygptError:
        held = f"no checkpoint was saved in {e.out} yet"
    return f"interrupted at step {e.step}: {held}"


def weights_step(out: Path) -> int:
    return weights.read_checkpoint(out).step


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("dataset", type=click.Choice(["shakespeare-char", "shakespeare", "text"]))
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option(
    "--input",
    "input_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Use this local text file instead of downloading the corpus.",
)
@click.option("--out", default=None, help="Output directory [data/shakespeare_char].")
@click.option(
    "--tokenizer",
    type=click.Choice(["gpt2", "char"]),
    default="gpt2",
    show_default=True,
    help="For `text`: GPT-2 BPE or characters.",
)
@click.option(
    "--val-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="For `text`: the share of the corpus (its end) held out for validation.",
)
def prepare(dataset, files, input_path, out, tokenizer, val_fraction) -> None:
    """Tokenize a corpus into train.bin / val.bin (uint16) and tokenizer.json.

    shakespeare-char: character level (vocab 65); shakespeare: GPT-2 BPE, split as nanoGPT;
    text FILE...: your own UTF-8 text files (`--tokenizer gpt2|char`, `--out DIR`)."""
    if dataset == "text":
        if not files or not out or input_path:
            raise PolygptError("usage: polygpt prepare text FILE... --out DIR [--tokenizer ...]")
        res = data.prepare_text(files, out, tokenizer, val_fraction, on_progress=_byte_bar())
    else:
        if files:
            raise PolygptError(f"{dataset} takes no FILE arguments (use --input FILE)")
        level = "char" if dataset == "shakespeare-char" else "bpe"
        out = out or ("data/shakespeare_char" if level == "char" else "data/shakespeare")
        res = data.prepare_shakespeare(out, input_path, level)
    click.echo(
        f"wrote {res.dir}: {res.train_tokens:,} train / {res.val_tokens:,} val tokens, "
        f"vocab {res.vocab_size}"
    )


def _byte_bar(min_bytes: int = 32 << 20):
    """A progress callback that shows a bar (on a terminal) once the input is large."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and total >= min_bytes and _bar_wanted(False):
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing")
        if bar is not None:
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

    return update


# ---------------------------------------------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@BACKEND
@DEVICE
@click.option("--out", "-o", default=None, help="Checkpoint directory (train.out).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out (any backend).")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint in --out.")
@QUIET
def train(config_file, overrides, backend, device, out, resume, overwrite, quiet) -> None:
    """Train (or --resume) a model. CONFIG_FILE is TOML; OVERRIDES are key=value pairs.

    \b
    polygpt train configs/shakespeare_char.toml max_iters=500
    polygpt train --resume --out weights/shakespeare_char --backend mlx max_iters=3000

    Ctrl-C stops a run with the checkpoint of its last evaluation on disk (nothing is saved on
    interrupt: the model may be mid-step), and `--resume` continues from there.
    """
    if config_file and "=" in config_file and not Path(config_file).exists():
        overrides, config_file = (config_file, *overrides), None
    if resume:
        target = out or (config.load(config_file).train.out if config_file else None)
        if target is None:
            raise PolygptError("--resume needs --out DIR (or a config whose train.out is set)")
        cfg = train_mod.config_for_resume(target, list(overrides))
    else:
        cfg = config.load(config_file, list(overrides))
    if backend:
        cfg.train.backend = backend
    if device:
        cfg.train.device = device
    if out:
        cfg.train.out = out
    view = TrainView(bar=_bar_wanted(quiet))
    try:
        res = train_mod.train(cfg, resume=resume, overwrite=overwrite, on_event=view)
    except train_mod.TrainInterrupted as e:
        view.close()
        click.echo(
            _interrupted(e, f"polygpt train --resume --out {shlex.quote(str(e.out))}"), err=True
        )
        sys.exit(130)
    if not res.is_main:  # another rank of a distributed run: rank 0 reports
        return
    vl = "n/a" if res.val_loss is None else f"{res.val_loss:.4f}"
    click.echo(f"checkpoint: {res.out} (step {res.step}, val loss {vl})")


def _unescape(s: str) -> str:
    """Shells make a newline hard to type: read \\n and \\t in stop strings as escapes."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("checkpoint", type=click.Path())
@BACKEND
@DEVICE
@precision_option()
@click.option("--prompt", default=None, help="Prompt text [sample.prompt, a newline].")
@click.option(
    "--prompt-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Read the prompt from a file.",
)
@click.option("--max-new-tokens", "-n", default=None, type=int, help="[sample.max_new_tokens]")
@click.option("--temperature", "-t", default=None, type=float, help="0 is greedy decoding.")
@click.option("--top-k", default=None, type=int, help="0 disables.")
@click.option("--top-p", default=None, type=float, help="1 disables.")
@click.option("--seed", default=None, type=int)
@click.option("--num-samples", default=None, type=int, help="Samples drawn as one batch.")
@click.option(
    "--stop",
    multiple=True,
    help="Stop a sample at this string (repeatable; \\n and \\t are understood).",
)
@click.option("--no-stream", is_flag=True, help="Print each sample when it is complete.")
@click.option(
    "--stats", is_flag=True, help="Report backend, precision, model size and tokens/s on stderr."
)
def sample(
    checkpoint,
    backend,
    device,
    precision,
    prompt,
    prompt_file,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    num_samples,
    stop,
    no_stream,
    stats,
) -> None:
    """Generate text from a checkpoint (KV cache, streaming).

    Options not given come from the [sample] section of the run's config (stored in the
    checkpoint), then from config.SampleConfig's defaults (500 tokens, temperature 0.8, seed
    1337). A prompt longer than the context keeps its last block_size tokens (with a note)."""
    if prompt is not None and prompt_file is not None:
        raise PolygptError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PolygptError(f"cannot read prompt file {prompt_file}: {e}") from None
    lm = inference.load(checkpoint, backend=backend, device=device or "auto", precision=precision)
    sc = inference.sample_config(lm.checkpoint)
    given = dict(
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        num_samples=num_samples,
    )
    for key, value in given.items():
        if value is not None:
            setattr(sc, key, value)
    if sc.num_samples < 1 or sc.max_new_tokens < 0:
        raise PolygptError("--num-samples must be >= 1 and --max-new-tokens >= 0")
    if sc.temperature < 0 or not 0 < sc.top_p <= 1:
        raise PolygptError("--temperature must be >= 0 and --top-p in (0, 1]")
    gcfg = GenerationConfig(
        max_new_tokens=sc.max_new_tokens,
        temperature=sc.temperature,
        top_k=sc.top_k,
        top_p=sc.top_p,
        seed=sc.seed,
        stop=[_unescape(s) for s in stop],
    )
    n_prompt = len(lm.encode(sc.prompt))  # fails (unknown character) before printing anything
    if n_prompt == 0:
        raise PolygptError("the prompt is empty: give at least one token (e.g. a newline)")
    if n_prompt > lm.spec.block_size:
        click.echo(
            f"note: the prompt is {n_prompt} tokens, longer than the context: generating from "
            f"its last {lm.spec.block_size} (block_size)",
            err=True,
        )
    stream = not no_stream and sc.num_samples == 1
    on_text = None
    if stream:
        click.echo(sc.prompt, nl=False)

        def on_text(row: int, text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

    t0 = time.perf_counter()
    texts = lm.generate([sc.prompt] * sc.num_samples, gcfg, on_text=on_text)
    seconds = time.perf_counter() - t0
    if stream:
        click.echo()
    else:
        for i, text in enumerate(texts):
            if sc.num_samples > 1:
                click.echo(f"--- sample {i + 1}/{sc.num_samples} ---")
            click.echo(sc.prompt + text)
    if stats:
        size = lm.sizes()
        n = sum(len(lm.encode(t)) for t in texts)
        click.echo(
            f"{lm.backend.name} on {lm.backend.device}, {lm.precision}; model "
            f"{size['file_bytes'] / 1e6:.2f} MB on disk, {size['memory_bytes'] / 1e6:.2f} MB "
            f"in memory; {n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):,.0f} tokens/s)",
            err=True,
        )


# ---------------------------------------------------------------------------------------------
@main.command("quantize")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(), help="New checkpoint directory.")
@precision_option(required=True, choices=["int8", "int4", "fp16", "bf16"])
@click.option(
    "--group-size",
    default=None,
    type=click.Choice(["32", "64", "128"]),
    help="Inputs per scale/bias (int8/int4) [64, or 32 if n_embd needs it].",
)
@BACKEND
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def quantize_(checkpoint, out, precision, group_size, backend, overwrite) -> None:
    """Write CHECKPOINT at a lower precision, as safetensors every backend loads.

    int8/int4 use one format for both frameworks (MLX's affine group quantization): MLX
    computes in 8/4 bits, torch dequantizes on load. fp16/bf16 are plain float files.

    \b
    polygpt quantize weights/shakespeare_char --out weights/shakespeare_char_int4 -p int4
    polygpt sample weights/shakespeare_char_int4 --backend mlx
    """
    res = quantize.quantize_checkpoint(
        checkpoint,
        out,
        precision,
        backend=backend,
        group_size=int(group_size) if group_size else None,
        overwrite=overwrite,
    )
    group = f", group size {res.group_size}" if res.group_size else ""
    click.echo(
        f"wrote {res.out} ({res.precision}{group}, with {res.backend}): model.safetensors "
        f"{res.bytes_before / 1e6:.2f} MB -> {res.bytes_after / 1e6:.2f} MB "
        f"({res.bytes_before / res.bytes_after:.1f}x smaller)"
    )


# ---------------------------------------------------------------------------------------------
def eval_lines(res: evaluate.EvalResult) -> list[str]:
    """`polygpt eval`'s report."""
    bits = (
        f"{res.bits_per_char:.4f} bits/char"
        if res.bits_per_char is not None
        else f"{res.bits_per_token:.4f} bits/token"
    )
    where = f"{res.backend} on {res.device}, {res.precision}".strip(", ")
    return [
        f"perplexity  {res.perplexity:.4f}  (95% interval {res.ppl_low:.4f} .. {res.ppl_high:.4f})",
        f"nll         {res.nll:.5f} ± {res.nll_se:.5f} nats/token (standard error), {bits}",
        f"scored      {res.tokens:,} tokens of the {res.split or '?'} split, {res.method}, "
        f"stride {res.stride}, block {res.block_size}, {res.n_windows:,} windows "
        f"in batches of {res.batch_size}",
        f"speed       {res.tokens_per_s:,.0f} tokens/s, {res.wall_s:.2f} s ({where})",
    ]


class EvalBar:
    """A tqdm bar for evaluation progress; only runs longer than a second get one."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, ev: evaluate.EvalProgress) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=ev.total,
                unit="tok",
                unit_scale=True,
                leave=False,
                dynamic_ncols=True,
                desc="eval",
                delay=1.0,
            )
        self.bar.update(ev.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    left context as the block allows (sliding windows, batched)."""
    bar = EvalBar() if _bar_wanted(as_json) else None
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


# ---------------------------------------------------------------------------------------------
def _csv(value: str, what: str, cast=str) -> list:
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise PolygptError(f"--{what} takes a comma-separated list, got {value!r}") from None


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
    cfg = bench_measure.BenchConfig(
        checkpoint=checkpoint,
        backends=None if backends == "all" else _csv(backends, "backends"),
        devices=None if devices == "auto" else _csv(devices, "devices"),
        precisions=list(PRECISIONS) if precisions == "all" else _csv(precisions, "precisions"),
        batch_sizes=_csv(batch_sizes, "batch-sizes", int),
        full_ppl=full_ppl,
        ppl_tokens=ppl_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        threads=n_threads,
        data_dir=data_dir,
    )
    if quick:
        cfg = bench.quick(cfg)
    result = bench.run_bench(cfg, out, on_event=_bench_line)
    click.echo(bench_report.markdown(result))
    click.echo(
        f"wrote {out}/results.json, results.csv, results.md, tokens_per_s.png, "
        f"ppl_vs_size.png ({result.wall_s:.0f}s)"
    )


def _bench_line(ev) -> None:
    if isinstance(ev, bench.LimitsStart):
        click.echo("measuring memory bandwidth and matmul peak ...", err=True)
    elif isinstance(ev, bench.ConfigStart):
        click.echo(f"{ev.backend}/{ev.device}/{ev.precision} ...", err=True)
    elif isinstance(ev, bench.ConfigDone):
        r = ev.row
        how = f" ({r.reason})" if r.reason else f" in {r.wall_s:.0f}s"
        click.echo(f"{r.name}: {r.status}{how}", err=True)


# ---------------------------------------------------------------------------------------------
def checkpoint_lines(path: str | Path) -> list[str]:
    """`polygpt info CHECKPOINT`: spec, parameters, step, metrics, recorded evaluations, files."""
    ckpt = weights.read_checkpoint(path)
    s, cfg = ckpt.spec, ckpt.config
    dtype = weights.check_model_file(ckpt.model_file, s)
    lines = [
        f"checkpoint  {ckpt.path}",
        f"spec        vocab {s.vocab_size}, block {s.block_size}, {s.n_layer} layers, "
        f"{s.n_head} heads, {s.n_embd} embd, bias={str(s.bias).lower()}, "
        f"dropout {s.dropout}, {s.activation}",
        f"parameters  {s.num_params():,} non-embedding, {s.num_params(False):,} total",
        f"flops       {s.flops_per_token(training=False):,}/token forward at full context",
        f"weights     {dtype}, trained with {cfg.get('backend', '?')} on {cfg.get('device', '?')}",
        f"step        {ckpt.step}",
    ]
    m = cfg.get("metrics") or {}
    if m:
        parts = [f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, (int, float))]
        lines.append(f"metrics     {', '.join(parts)}")
    for key, rec in sorted(m.items()):  # full-split perplexity from `polygpt eval --save`
        if key.startswith("eval_") and isinstance(rec, dict) and "perplexity" in rec:
            lines.append(
                f"perplexity  {rec['perplexity']:.4f} [{rec['ppl_low']:.4f}, {rec['ppl_high']:.4f}]"
                f" on {rec['tokens']:,} {rec.get('split', key[5:])} tokens ({rec['method']}, "
                f"stride {rec['stride']}, {rec.get('backend', '?')} {rec.get('precision', '')})"
            )
    files = weights.dir_size(ckpt.path)
    lines.append("files       " + ", ".join(f"{n} {b / 1e6:.2f} MB" for n, b in files.items()))
    return lines


def environment_lines() -> list[str]:
    """`polygpt info`: each framework, its default device, BLAS and threads."""
    lines = []
    avail = set(available_backends())
    for name in known_backends():
        if name not in avail:
            lines.append(f"{name:<6}  not installed (pip install 'polygpt[{name}]')")
            continue
        try:
            d = get_backend(name, "auto").describe()
        except PolygptError as e:
            lines.append(f"{name:<6}  unavailable: {e}")
            continue
        lines.append(
            f"{name:<6}  {d['framework']}, device {d['device']} ({d['device_name']}), "
            f"BLAS: {d['blas']}, threads {d['threads']}"
        )
    return lines


@main.command()
@click.argument("checkpoint", required=False, type=click.Path())
def info(checkpoint) -> None:
    """Show a checkpoint (spec, parameters, step, losses, files) and the frameworks here."""
    if checkpoint:
        for line in checkpoint_lines(checkpoint):
            click.echo(line)
        click.echo("")
    for line in environment_lines() + distributed.environment_lines():
        click.echo(line)


# ---------------------------------------------------------------------------------------------
@main.command("sweep")
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--only", multiple=True, help="Run only this run (repeatable).")
@QUIET
def sweep_(sweep_file, only, quiet) -> None:
    """Train, evaluate and sample every run of a sweep file; finished runs are skipped.

    \b
    polygpt sweep experiments/shakespeare.toml
    polygpt sweep experiments/shakespeare.toml --only 0.8M-500
    """
    sw = sweep.load_sweep(sweep_file)
    view = TrainView(bar=_bar_wanted(quiet))

    def on_event(ev) -> None:
        if isinstance(ev, sweep.RunSkipped):
            click.echo(f"[{ev.name}] finished earlier: skipped")
        elif isinstance(ev, sweep.RunStart):
            what = "resuming" if ev.resumed else "training"
            click.echo(f"[{ev.name}] {what} ({ev.backend}) -> {ev.out}")
        else:
            view(ev)

    try:
        results = sweep.run_sweep(sw, only=list(only) or None, on_event=on_event)
    except train_mod.TrainInterrupted as e:
        view.close()
        click.echo(_interrupted(e, f"polygpt sweep {shlex.quote(sweep_file)}"), err=True)
        sys.exit(130)
    click.echo(sweep.results_table(results))
    click.echo(f"results: {sw.results}/results.json, {sw.results}/results.md")


@main.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="PNG file.")
@click.option(
    "--kind",
    type=click.Choice(list(plot.KINDS)),
    default="loss",
    show_default=True,
    help="Loss curves, or perplexity vs iterations / vs size.",
)
@click.option("--title", default=None)
def plot_(runs, out, kind, title) -> None:
    """Plot one or more runs (checkpoint directories) to a PNG."""
    click.echo(f"wrote {plot.plot(list(runs), out, kind, title)}")


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "--from",
    "src_format",
    type=click.Choice(["auto", *convert_mod.FORMATS]),
    default="auto",
    show_default=True,
    help="nanogpt: a ckpt.pt; hf: a Hugging Face GPT-2 directory; polygpt: ours.",
)
@click.option(
    "--to",
    "dst_format",
    type=click.Choice(["polygpt", "hf"]),
    default=None,
    help="Default: polygpt, or hf when SOURCE is a polygpt checkpoint.",
)
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Prepared data directory whose tokenizer.json a char-level import uses.",
)
def convert(source, out, src_format, dst_format, tokenizer_dir) -> None:
    """Convert between nanoGPT ckpt.pt, Hugging Face GPT-2 and polygpt checkpoints.

    \b
    polygpt convert ckpt.pt weights/from_nanogpt --tokenizer data/shakespeare_char
    polygpt convert weights/shakespeare_char exported_hf --to hf
    polygpt convert path/to/hf-gpt2 weights/gpt2
    """
    done, fmt = convert_mod.convert(source, out, src_format, dst_format, tokenizer_dir)
    click.echo(f"wrote {done} ({fmt})")


# ---------------------------------------------------------------------------------------------
def _needs_serve_extra() -> None:
    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        raise PolygptError("serving needs fastapi and uvicorn: pip install 'polygpt[serve]'")


@main.command()
@click.argument("checkpoint", type=click.Path())
@BACKEND
@DEVICE
@precision_option()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="0 picks a free port.")
@click.option("--max-batch", default=16, show_default=True, type=int, help="Rows decoded at once.")
@click.option("--max-tokens-limit", default=2048, show_default=True, type=int)
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests that may wait for a free row; beyond, a 429 with Retry-After.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds a request may take (queue included); then it is cancelled. Default: none.",
)
@click.option(
    "--chat-template",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="TOML file: message, generation and stop of /v1/chat/completions' prompt.",
)
def serve(
    checkpoint, backend, device, precision, host, port, max_batch, max_tokens_limit, **kw
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)."""
    _needs_serve_extra()
    from polygpt.serve import serve as run  # the optional [serve] extra (fastapi, uvicorn)

    run(
        checkpoint, backend, device or "auto", precision, host, port, max_batch,
        max_tokens_limit, **kw,
    )  # fmt: skip


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
@click.option("--json", "as_json", type=click.Path(dir_okay=False), help="Also write JSON here.")
def bench_serve(
    checkpoint, backends, device, clients, duration, max_tokens, rounds, n, prompt, url, as_json
):
    """Load-test `polygpt serve` on localhost: 1 client, then N concurrent, per backend."""
    _needs_serve_extra()
    names = available_backends() if backends == "all" else backends.split(",")
    if min(clients, max_tokens, rounds, n) < 1 or duration <= 0:
        raise PolygptError("--clients, --duration, --max-tokens, --rounds, --n must be positive")
    click.echo(serve_bench.HEADER)
    res = serve_bench.bench_serve(
        checkpoint, names, clients, duration, max_tokens, prompt=prompt,
        device=device or "auto", rounds=rounds, n=n, url=url,
    )  # fmt: skip
    for line in serve_bench.speedups(res):
        click.echo(line)
    if as_json:
        Path(as_json).write_text(serve_bench.to_json(res) + "\n", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    main()
