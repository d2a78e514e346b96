"""Commands that generate: `sample` (from a checkpoint, streaming) and `serve` (an
OpenAI-compatible HTTP API)."""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import click

from polygpt import config, hub, inference
from polygpt.cli.app import BACKEND, DEVICE, main, needs_serve_extra, precision_option
from polygpt.engine import Event, InvalidRequest, TextChunk
from polygpt.errors import PolygptError
from polygpt.generate import GenerationConfig, finish


def _unescape(s: str) -> str:
    """Shells make a newline hard to type: read \\n and \\t in stop strings as escapes."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


@dataclass
class SampleOptions:
    """What `polygpt sample` was asked for; None: the checkpoint's [sample] section decides,
    then config.SampleConfig's defaults."""

    prompt: str | None = None
    prompt_file: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    num_samples: int | None = None
    stop: tuple[str, ...] = ()

    def resolve(self, sc: config.SampleConfig) -> tuple[config.SampleConfig, GenerationConfig]:
        """`sc` (the checkpoint's [sample]) with what was given on top, and the generation
        settings it makes; one-line errors for values out of range."""
        if self.prompt is not None and self.prompt_file is not None:
            raise PolygptError("give --prompt or --prompt-file, not both")
        if self.prompt_file is not None:
            try:
                sc.prompt = Path(self.prompt_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise PolygptError(f"cannot read prompt file {self.prompt_file}: {e}") from None
        for key in (
            "prompt",
            "max_new_tokens",
            "temperature",
            "top_k",
            "top_p",
            "seed",
            "num_samples",
        ):
            if getattr(self, key) is not None:
                setattr(sc, key, getattr(self, key))
        if sc.num_samples < 1:  # the rest is checked by the engine, once
            raise PolygptError("--num-samples must be >= 1")
        gcfg = GenerationConfig(
            max_new_tokens=sc.max_new_tokens,
            temperature=sc.temperature,
            top_k=sc.top_k,
            top_p=sc.top_p,
            seed=sc.seed,
            stop=[_unescape(s) for s in self.stop],
        )
        return sc, gcfg


_SAMPLE_OPTIONS = [
    click.option("--prompt", default=None, help="Prompt text [sample.prompt, a newline]."),
    click.option(
        "--prompt-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Read the prompt from a file.",
    ),
    click.option("--max-new-tokens", "-n", default=None, type=int, help="[sample.max_new_tokens]"),
    click.option("--temperature", "-t", default=None, type=float, help="0 is greedy decoding."),
    click.option("--top-k", default=None, type=int, help="0 disables."),
    click.option("--top-p", default=None, type=float, help="1 disables."),
    click.option("--seed", default=None, type=int),
    click.option("--num-samples", default=None, type=int, help="Samples drawn as one batch."),
    click.option(
        "--stop",
        multiple=True,
        help="Stop a sample at this string (repeatable; \\n and \\t are understood).",
    ),
]


def sample_options(command):
    """The generation options as click options, handed to `command` as one SampleOptions
    (`opts`)."""
    names = [f.name for f in fields(SampleOptions)]

    @functools.wraps(command)
    def wrapper(*args, **kw):
        opts = SampleOptions(**{n: kw.pop(n) for n in names})
        return command(*args, opts=opts, **kw)

    for option in reversed(_SAMPLE_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


# ---------------------------------------------------------------------------------------------
def _print_text(ev: Event) -> None:
    if isinstance(ev, TextChunk):
        sys.stdout.write(ev.text)
        sys.stdout.flush()


@main.command()
@click.argument("checkpoint", type=click.Path())
@BACKEND
@DEVICE
@precision_option()
@sample_options
@click.option("--no-stream", is_flag=True, help="Print each sample when it is complete.")
@click.option(
    "--stats", is_flag=True, help="Report backend, precision, model size and tokens/s on stderr."
)
def sample(checkpoint, backend, device, precision, opts: SampleOptions, no_stream, stats) -> None:
    """Generate text from a checkpoint (KV cache, streaming).

    CHECKPOINT is a directory or a Hugging Face GPT-2 id (gpt2, gpt2-medium, owner/name@rev),
    fetched and converted once into polygpt's cache (see `polygpt info`).

    Options not given come from the [sample] section of the run's config (stored in the
    checkpoint), then from config.SampleConfig's defaults. A prompt longer than the context
    keeps its last block_size tokens (with a note)."""
    if opts.prompt is not None and opts.prompt_file is not None:  # before loading the model
        raise PolygptError("give --prompt or --prompt-file, not both")
    ckpt = hub.checkpoint(checkpoint)  # a directory, or a model id fetched and converted once
    lm = inference.load(ckpt, backend=backend, device=device or "auto", precision=precision)
    sc, gcfg = opts.resolve(inference.sample_config(lm.checkpoint))
    n_prompt = len(lm.encode(sc.prompt))  # fails (unknown character) before printing anything
    if n_prompt > lm.spec.block_size:
        click.echo(
            f"note: the prompt is {n_prompt} tokens, longer than the context: generating from "
            f"its last {lm.spec.block_size} (block_size)",
            err=True,
        )
    stream = not no_stream and sc.num_samples == 1
    t0 = time.perf_counter()
    try:  # the engine checks the request before the first event: nothing printed yet
        events = lm.stream([sc.prompt] * sc.num_samples, gcfg, stream_text=stream)
    except InvalidRequest as e:  # named as the option that set it
        option = "--max-new-tokens" if e.param == "max_tokens" else f"--{e.param.replace('_', '-')}"
        raise PolygptError(f"{option}: {e}") from None
    if stream:
        click.echo(sc.prompt, nl=False)
    texts = [f.text for f in finish(events, _print_text if stream else None)]
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
            f"{lm.backend.name} on {lm.backend.device}, {lm.precision} "
            f"({lm.backend.kernel(lm.precision)}); model "
            f"{size['file_bytes'] / 1e6:.2f} MB on disk, {size['memory_bytes'] / 1e6:.2f} MB "
            f"in memory; {n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):,.0f} tokens/s)",
            err=True,
        )


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
    """Serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching).

    CHECKPOINT is a directory or a Hugging Face GPT-2 id, as for `polygpt sample`."""
    needs_serve_extra()
    from polygpt.serve import serve as run  # the optional [serve] extra (fastapi, uvicorn)

    run(
        hub.checkpoint(checkpoint), backend, device or "auto", precision, host, port, max_batch,
        max_tokens_limit, **kw,
    )  # fmt: skip
