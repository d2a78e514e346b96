"""Commands that train: `train` (new runs, fine-tuning with train.init_from, --resume),
`sweep` (a grid of runs) and `plot` (their curves)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from polygpt import config, plot, sweep
from polygpt import train as train_mod
from polygpt.cli.app import BACKEND, DEVICE, QUIET, bar_wanted, main
from polygpt.cli.views import TrainView, interrupted
from polygpt.errors import PolygptError


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
    view = TrainView(bar=bar_wanted(quiet))
    try:
        res = train_mod.train(cfg, resume=resume, overwrite=overwrite, on_event=view)
    except train_mod.TrainInterrupted as e:
        view.close()
        click.echo(
            interrupted(e, f"polygpt train --resume --out {shlex.quote(str(e.out))}"),
            err=True,
        )
        sys.exit(130)
    if not res.is_main:  # another rank of a distributed run: rank 0 reports
        return
    vl = "n/a" if res.val_loss is None else f"{res.val_loss:.4f}"
    click.echo(f"checkpoint: {res.out} (step {res.step}, val loss {vl})")


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
    view = TrainView(bar=bar_wanted(quiet))

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
        click.echo(interrupted(e, f"polygpt sweep {shlex.quote(sweep_file)}"), err=True)
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
