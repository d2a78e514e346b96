"""What the CLI draws: workflow events (training, evaluation, bench) as lines on stdout and
progress bars on stderr (a bar only when stderr is a terminal), and `polygpt info`'s report.
Workflows print nothing; these turn what they report into text.
"""

from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from polygpt import checkpoints, evaluate, hub
from polygpt import train as train_mod
from polygpt.backends import available_backends, get_backend, known_backends
from polygpt.bench import run as bench
from polygpt.cli.app import bar_wanted
from polygpt.errors import PolygptError


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


def interrupted(e: train_mod.TrainInterrupted, resume_hint: str) -> str:
    """The one line Ctrl-C during training leaves: where it stopped, what is on disk."""
    try:
        held = f"{e.out} holds the checkpoint of step {weights_step(e.out)}; resume with: "
        held += resume_hint
    except PolygptError:
        held = f"no checkpoint was saved in {e.out} yet"
    return f"interrupted at step {e.step}: {held}"


def weights_step(out: Path) -> int:
    return checkpoints.read(out).step


def byte_bar(min_bytes: int = 32 << 20):
    """A progress callback that shows a bar (on a terminal) once the input is large."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and total >= min_bytes and bar_wanted(False):
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing")
        if bar is not None:
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

    return update


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


def bench_line(ev) -> None:
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
    ckpt = checkpoints.read(path)
    s, cfg = ckpt.spec, ckpt.config
    lines = [
        f"checkpoint  {ckpt.path}",
        f"spec        vocab {s.vocab_size}, block {s.block_size}, {s.n_layer} layers, "
        f"{s.n_head} heads, {s.n_embd} embd, bias={str(s.bias).lower()}, "
        f"dropout {s.dropout}, {s.activation}",
        f"parameters  {s.num_params():,} non-embedding, {s.num_params(False):,} total",
        f"flops       {s.flops_per_token(training=False):,}/token forward at full context",
        f"weights     {ckpt.model.dtype}, trained with {cfg.get('backend', '?')} on "
        f"{cfg.get('device', '?')}",
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
    files = checkpoints.dir_size(ckpt.path)
    lines.append("files       " + ", ".join(f"{n} {b / 1e6:.2f} MB" for n, b in files.items()))
    return lines


def hub_cache_lines() -> list[str]:
    """`polygpt info`: where models fetched by name were converted (safe to delete)."""
    models = hub.converted_models()
    size = sum(sum(checkpoints.dir_size(m).values()) for m in models)
    where = hub.cache_root() / "hub"
    lines = [f"hub     models fetched by name: {len(models)}, {size / 1e9:.2f} GB, in {where}"]
    return lines + [f"        {m.name}" for m in models]


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
        lines.append(f"{'':<6}  matmul kernels: {d['kernels']}")
    return lines
