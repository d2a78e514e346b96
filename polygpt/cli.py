"""The `polygpt` command line: parse, call a workflow, format. No model code here."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from polygpt import __version__
from polygpt.errors import PolygptError


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


BACKEND = click.option("--backend", "-b", default=None, help="torch or mlx.")
DEVICE = click.option(
    "--device",
    "-d",
    default="auto",
    show_default=True,
    help="auto, cpu, cuda, mps (torch) or gpu (mlx).",
)


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
    from polygpt import data

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
        if bar is None and total >= min_bytes and sys.stderr.isatty():
            from tqdm import tqdm

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
@click.option("--device", "-d", default=None, help="auto, cpu, cuda, mps (torch) or gpu (mlx).")
@click.option("--out", "-o", default=None, help="Checkpoint directory (train.out).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out (any backend).")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def train(config_file, overrides, backend, device, out, resume, overwrite, quiet) -> None:
    """Train (or --resume) a model. CONFIG_FILE is TOML; OVERRIDES are key=value pairs.

    \b
    polygpt train configs/shakespeare_char.toml max_iters=500
    polygpt train --resume --out weights/shakespeare_char --backend mlx max_iters=3000
    """
    from polygpt import config as config_mod
    from polygpt import train as train_mod

    if config_file and "=" in config_file and not Path(config_file).exists():
        overrides, config_file = (config_file, *overrides), None
    if resume:
        target = out or (config_mod.load(config_file).train.out if config_file else None)
        if target is None:
            raise PolygptError("--resume needs --out DIR (or a config whose train.out is set)")
        cfg = train_mod.config_for_resume(target, list(overrides))
    else:
        cfg = config_mod.load(config_file, list(overrides))
    if backend:
        cfg.train.backend = backend
    if device:
        cfg.train.device = device
    if out:
        cfg.train.out = out
    res = train_mod.train(
        cfg, resume=resume, overwrite=overwrite, progress=not quiet, log=click.echo
    )
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
@click.option(
    "--precision",
    "-p",
    default=None,
    help="fp32, fp16, bf16, int8 (torch CPU; mlx), int4 (mlx) [the checkpoint's; "
    "torch computes an int8/int4 checkpoint in fp32].",
)
@click.option("--prompt", default=None, help="Prompt text [a newline].")
@click.option(
    "--prompt-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Read the prompt from a file.",
)
@click.option("--max-new-tokens", "-n", default=500, show_default=True, type=int)
@click.option(
    "--temperature", "-t", default=0.8, show_default=True, type=float, help="0 is greedy decoding."
)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 disables.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="1 disables.")
@click.option("--seed", default=1337, show_default=True, type=int)
@click.option(
    "--num-samples", default=1, show_default=True, type=int, help="Samples drawn as one batch."
)
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
    """Generate text from a checkpoint (KV cache, streaming)."""
    from polygpt import inference
    from polygpt.generate import GenerationConfig, check_prompts

    if prompt is not None and prompt_file is not None:
        raise PolygptError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PolygptError(f"cannot read prompt file {prompt_file}: {e}") from None
    if prompt is None:
        prompt = "\n"
    if num_samples < 1 or max_new_tokens < 0:
        raise PolygptError("--num-samples must be >= 1 and --max-new-tokens >= 0")
    if temperature < 0 or not 0 < top_p <= 1:
        raise PolygptError("--temperature must be >= 0 and --top-p in (0, 1]")
    lm = inference.load(checkpoint, backend=backend, device=device, precision=precision)
    gcfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=[_unescape(s) for s in stop],
    )
    check_prompts([lm.encode(prompt)], lm.spec.block_size)  # fail before printing anything
    stream = not no_stream and num_samples == 1
    on_text = None
    if stream:
        click.echo(prompt, nl=False)

        def on_text(row: int, text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

    t0 = time.perf_counter()
    texts = lm.generate([prompt] * num_samples, gcfg, on_text=on_text)
    seconds = time.perf_counter() - t0
    if stream:
        click.echo()
    else:
        for i, text in enumerate(texts):
            if num_samples > 1:
                click.echo(f"--- sample {i + 1}/{num_samples} ---")
            click.echo(prompt + text)
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
@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(), help="New checkpoint directory.")
@click.option(
    "--precision", "-p", required=True, type=click.Choice(["int8", "int4", "fp16", "bf16"])
)
@click.option(
    "--group-size",
    default=None,
    type=click.Choice(["32", "64", "128"]),
    help="Inputs per scale/bias (int8/int4) [64, or 32 if n_embd needs it].",
)
@BACKEND
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def quantize(checkpoint, out, precision, group_size, backend, overwrite) -> None:
    """Write CHECKPOINT at a lower precision, as safetensors every backend loads.

    int8/int4 use one format for both frameworks (MLX's affine group quantization): MLX
    computes in 8/4 bits, torch dequantizes on load. fp16/bf16 are plain float files.

    \b
    polygpt quantize weights/shakespeare_char --out weights/shakespeare_char_int4 -p int4
    polygpt sample weights/shakespeare_char_int4 --backend mlx
    """
    from polygpt import quantize as quant

    res = quant.quantize_checkpoint(
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
@main.command("eval")
@click.argument("checkpoint", type=click.Path())
@BACKEND
@DEVICE
@click.option(
    "--precision",
    "-p",
    default="fp32",
    show_default=True,
    help="fp32, fp16, bf16, int8 (torch CPU; mlx), int4 (mlx).",
)
@click.option("--split", default="val", show_default=True, type=click.Choice(["val", "train"]))
@click.option(
    "--data", "data_dir", default=None, help="Prepared data directory [the checkpoint's data.dir]."
)
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
    import json

    from polygpt import evaluate

    res = evaluate.evaluate_checkpoint(
        checkpoint,
        backend=backend,
        device=device,
        precision=precision,
        split=split,
        data_dir=data_dir,
        max_tokens=max_tokens,
        method=method,
        stride=stride,
        batch_size=batch_size,
        progress=not as_json,
    )
    if save:
        evaluate.save_result(checkpoint, res)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
    else:
        for line in evaluate.format_result(res):
            click.echo(line)


# ---------------------------------------------------------------------------------------------
def _csv(value: str, what: str, cast=str) -> list:
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise PolygptError(f"--{what} takes a comma-separated list, got {value!r}") from None


@main.command()
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
@click.option(
    "--data", "data_dir", default=None, help="Prepared data directory [the checkpoint's data.dir]."
)
@click.option(
    "--quick",
    is_flag=True,
    help="Batch 1, KV decode, short runs, no training rate: GPT-2 124M in minutes on a CPU.",
)
def bench(
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
    from polygpt import bench as bench_mod

    try:
        n_threads = -1 if threads == "auto" else int(threads)
    except ValueError:
        raise PolygptError(f"--threads takes a number or auto, got {threads!r}") from None
    cfg = bench_mod.BenchConfig(
        checkpoint=checkpoint,
        backends=None if backends == "all" else _csv(backends, "backends"),
        devices=None if devices == "auto" else _csv(devices, "devices"),
        precisions=list(bench_mod.PRECISIONS)
        if precisions == "all"
        else _csv(precisions, "precisions"),
        batch_sizes=_csv(batch_sizes, "batch-sizes", int),
        full_ppl=full_ppl,
        ppl_tokens=ppl_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        threads=n_threads,
        data_dir=data_dir,
    )
    if quick:
        cfg = bench_mod.quick(cfg)
    result = bench_mod.run_bench(cfg, out, log=lambda s: click.echo(s, err=True))
    click.echo(bench_mod.markdown(result))
    click.echo(
        f"wrote {out}/results.json, results.csv, results.md, tokens_per_s.png, "
        f"ppl_vs_size.png ({result['wall_s']:.0f}s)"
    )


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("checkpoint", required=False, type=click.Path())
def info(checkpoint) -> None:
    """Show a checkpoint (spec, parameters, step, losses, files) and the frameworks here."""
    from polygpt import inference

    if checkpoint:
        for line in inference.checkpoint_info_lines(checkpoint):
            click.echo(line)
        click.echo("")
    from polygpt import distributed

    for line in inference.environment_lines() + distributed.environment_lines():
        click.echo(line)


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--only", multiple=True, help="Run only this run (repeatable).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def sweep(sweep_file, only, quiet) -> None:
    """Train, evaluate and sample every run of a sweep file; finished runs are skipped.

    \b
    polygpt sweep experiments/shakespeare.toml
    polygpt sweep experiments/shakespeare.toml --only 0.8M-500
    """
    from polygpt import sweep as sweep_mod

    sw = sweep_mod.load_sweep(sweep_file)
    results = sweep_mod.run_sweep(sw, only=list(only) or None, progress=not quiet, log=click.echo)
    click.echo(sweep_mod.results_table(results))
    click.echo(f"results: {sw.results}/results.json, {sw.results}/results.md")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="PNG file.")
@click.option(
    "--kind",
    type=click.Choice(["loss", "ppl-iters", "ppl-params"]),
    default="loss",
    show_default=True,
    help="Loss curves, or perplexity vs iterations / vs size.",
)
@click.option("--title", default=None)
def plot(runs, out, kind, title) -> None:
    """Plot one or more runs (checkpoint directories) to a PNG."""
    from polygpt import plot as plot_mod

    click.echo(f"wrote {plot_mod.plot(list(runs), out, kind, title)}")


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "--from",
    "src_format",
    type=click.Choice(["auto", "nanogpt", "hf", "polygpt"]),
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
    from polygpt import convert as conv

    src = Path(source)
    if src_format == "auto":
        if src.is_file() and src.suffix in (".pt", ".pth"):
            src_format = "nanogpt"
        elif (src / "tokenizer.json").exists() and (src / "model.safetensors").exists():
            src_format = "polygpt"
        elif (src / "config.json").exists():
            src_format = "hf"
        else:
            raise PolygptError(f"cannot tell what {src} is: pass --from nanogpt|hf|polygpt")
    dst_format = dst_format or ("hf" if src_format == "polygpt" else "polygpt")
    if src_format == "polygpt" and dst_format == "hf":
        done = conv.to_hf(src, out)
    elif src_format == "nanogpt" and dst_format == "polygpt":
        done = conv.from_nanogpt(src, out, tokenizer_dir)
    elif src_format == "hf" and dst_format == "polygpt":
        done = conv.from_hf(src, out, tokenizer_dir)
    else:
        raise PolygptError(f"no conversion from {src_format} to {dst_format}")
    click.echo(f"wrote {done} ({dst_format})")


# ---------------------------------------------------------------------------------------------
def _needs_serve_extra() -> None:
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        raise PolygptError("serving needs fastapi and uvicorn: pip install 'polygpt[serve]'")


@main.command()
@click.argument("checkpoint", type=click.Path())
@BACKEND
@DEVICE
@click.option("--precision", "-p", default=None, help="As for sample [the checkpoint's].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="0 picks a free port.")
@click.option("--max-batch", default=16, show_default=True, type=int, help="Rows decoded at once.")
@click.option("--max-tokens-limit", default=2048, show_default=True, type=int)
def serve(checkpoint, backend, device, precision, host, port, max_batch, max_tokens_limit) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)."""
    _needs_serve_extra()
    from polygpt.serve import serve as run

    run(checkpoint, backend, device, precision, host, port, max_batch, max_tokens_limit)


@main.command("bench-serve")
@click.argument("checkpoint", type=click.Path())
@click.option("--backends", default="all", show_default=True, help="all, or e.g. torch,mlx.")
@DEVICE
@click.option("--clients", default=16, show_default=True, type=int, help="Concurrent clients.")
@click.option("--duration", default=20.0, show_default=True, type=float, help="Seconds per run.")
@click.option("--max-tokens", default=64, show_default=True, type=int, help="Per request.")
@click.option("--json", "as_json", type=click.Path(dir_okay=False), help="Also write JSON here.")
def bench_serve(checkpoint, backends, device, clients, duration, max_tokens, as_json) -> None:
    """Load-test `polygpt serve` on localhost: 1 client, then N concurrent, per backend."""
    _needs_serve_extra()
    from polygpt import serve_bench as sb
    from polygpt.backends import available_backends

    names = available_backends() if backends == "all" else backends.split(",")
    if clients < 1 or duration <= 0 or max_tokens < 1:
        raise PolygptError("--clients, --duration and --max-tokens must be positive")
    click.echo(sb.HEADER)
    res = sb.bench_serve(checkpoint, names, clients, duration, max_tokens, device=device)
    for line in sb.speedups(res):
        click.echo(line)
    if as_json:
        Path(as_json).write_text(sb.to_json(res) + "\n", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    main()
