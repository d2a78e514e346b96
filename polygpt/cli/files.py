"""Commands on data and checkpoint files: `prepare` (tokenize a corpus), `convert`
(nanoGPT / Hugging Face / polygpt), `quantize` (int8, int4, fp16, bf16) and `info`."""

from __future__ import annotations

import click

from polygpt import convert as convert_mod
from polygpt import data, distributed, hub, quantize
from polygpt.cli.app import BACKEND, main, precision_option
from polygpt.cli.views import byte_bar, checkpoint_lines, environment_lines, hub_cache_lines
from polygpt.errors import PolygptError


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
        res = data.prepare_text(files, out, tokenizer, val_fraction, on_progress=byte_bar())
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

    int8/int4 use one format for both frameworks (MLX's affine group quantization), which
    both compute with in 8/4 bits. fp16/bf16 are plain float files.

    \b
    polygpt quantize weights/demo --out weights/demo_int4 -p int4
    polygpt sample weights/demo_int4 --backend mlx
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


@main.command()
@click.argument("checkpoint", required=False, type=click.Path())
def info(checkpoint) -> None:
    """Show a checkpoint (spec, parameters, step, losses, files) and the frameworks here."""
    if checkpoint:
        for line in checkpoint_lines(checkpoint):
            click.echo(line)
        click.echo("")
    for line in environment_lines() + distributed.environment_lines() + hub_cache_lines():
        click.echo(line)


@main.command()
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "--from",
    "src_format",
    type=click.Choice(["auto", *convert_mod.FORMATS]),
    default="auto",
    show_default=True,
    help="nanogpt: a ckpt.pt; hf: a Hugging Face GPT-2 directory or model id; polygpt: ours.",
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
    polygpt convert gpt2-medium weights/gpt2-medium          # fetched from the Hugging Face Hub
    polygpt convert openai-community/gpt2@main weights/gpt2  # NAME@REVISION: branch, tag, commit
    """
    done, fmt = hub.convert(source, out, src_format, dst_format, tokenizer_dir)
    click.echo(f"wrote {done} ({fmt})")
