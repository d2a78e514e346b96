"""The `polygpt` click group and the options several commands share (one definition each).

Commands live one module per family (training, generation, measuring, files); the views that
draw workflow events as lines and bars in views.py.
"""

from __future__ import annotations

import importlib.util
import sys

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
        help="fp32, fp16, bf16, int8, int4 (torch's int8/int4: CPU) [the checkpoint's].",
        **kw,
    )


def bar_wanted(quiet: bool) -> bool:
    """Progress bars only on a terminal: in a file or pipe they are carriage-return frames."""
    return not quiet and sys.stderr.isatty()


def csv_list(value: str, what: str, cast=str) -> list:
    """--OPTION a,b,c as a list (each item cast); a one-line error naming the option."""
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise PolygptError(f"--{what} takes a comma-separated list, got {value!r}") from None


def needs_serve_extra() -> None:
    """Serving and its load test need the optional [serve] extra."""
    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        raise PolygptError("serving needs fastapi and uvicorn: pip install 'polygpt[serve]'")
