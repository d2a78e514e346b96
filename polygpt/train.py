"""The training loop, written once for every backend.

nanoGPT's recipe: AdamW with weight decay on 2-D tensors, linear warmup then cosine decay to
min_lr, gradient clipping, periodic train/val loss estimates on fixed batches, a checkpoint at
each evaluation. Batches come from a seeded NumPy generator whose state is saved with the
checkpoint, so a resumed run (in either backend) sees the same batch stream as an unbroken one.

`train()` joins the process group when a launcher started it (torchrun, mlx.launch; see
distributed.py), takes the run lock, then runs `setup` (new run, fine-tuning init or resume)
and `loop`; the loop's parts are small functions of one `Run` (`draw_batches`, `evaluate`,
`save`). Every rank draws the same global batch and trains on its slice; rank 0 alone
evaluates, writes and reports. It prints nothing: it reports typed events (TrainStart,
TrainStep, Evaluated, Saved, TrainEnd) to `on_event`, and the caller (cli/views.py) draws them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from polygpt import (
    __version__,
    atomic,
    checkpoints,
    data,
    distributed,
    metrics_log,
    modelfile,
    rundir,
)
from polygpt.backends import get_backend
from polygpt.config import RunConfig, TrainConfig, from_dict, parse_override
from polygpt.errors import PolygptError
from polygpt.finetune import load_init
from polygpt.spec import ModelSpec
from polygpt.tokenizer import Tokenizer

# estimate_loss stacks batches into forwards of at most this many logits (and as many positions
# as the backend's eval_positions says run fastest)
_EVAL_LOGITS = 1 << 26


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then flat."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


@dataclass
class TrainResult:
    out: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    ms_per_iter: float
    tokens_per_s: float
    wall_s: float
    backend: dict
    is_main: bool = True  # False on the other ranks of a distributed run (they write nothing)


def estimate_loss(
    backend,
    model,
    splits: dict[str, np.ndarray],
    block_size: int,
    batch_size: int,
    iters: int,
    seed: int,
    vocab_size: int = 0,
    dtype: str = "fp32",
) -> dict[str, float]:
    """Mean loss over `iters` batches per split; the batches depend only on (seed, split).

    With `vocab_size`, equal batches are stacked into one forward of up to the backend's
    eval_positions (and at most 64M logits): the same mean over the same tokens in the calls
    that run fastest. `dtype` is the forward's precision (dtypes())."""
    group = 1
    if vocab_size > 0:
        rows = batch_size * block_size
        positions = backend.eval_positions(dtype)
        group = max(1, min(iters, positions // rows, _EVAL_LOGITS // (rows * vocab_size)))
    out = {}
    for i, (name, arr) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, i])
        batches = [data.get_batch(arr, block_size, batch_size, rng) for _ in range(iters)]
        total = 0.0
        for j in range(0, iters, group):
            chunk = batches[j : j + group]
            x = np.concatenate([b[0] for b in chunk])
            y = np.concatenate([b[1] for b in chunk])
            total += backend.eval_loss(model, x, y, dtype) * len(chunk)  # mean of equal batches
        out[name] = total / iters
    return out


# ---- events: what a run reports (cli/views.py draws them as lines and a progress bar) ---------


@dataclass
class TrainStart:
    out: Path
    step: int  # the step training starts from: 0, or the resumed checkpoint's
    max_iters: int
    resumed: bool
    params: int  # non-embedding
    params_total: int
    backend: str
    device: str
    describe: dict[str, str]  # Backend.describe(): framework, device name, BLAS, threads
    processes: str  # distributed.World.describe(): "1 process", or how many and over what
    dtype: str = "fp32"  # the training step's precision
    eval_dtype: str = "fp32"  # the loss estimates' forward precision


@dataclass
class TrainStep:
    step: int  # optimizer steps done
    lr: float  # the rate this step used
    loss: float | None  # the step's loss at log_interval steps (a host sync), else None


@dataclass
class Evaluated:
    step: int
    train_loss: float
    val_loss: float
    val_ppl: float
    lr: float
    eval_s: float = 0.0  # how long the estimate took (the speed benchmarks subtract it)


@dataclass
class Saved:
    step: int
    out: Path


@dataclass
class TrainEnd:
    result: TrainResult
    timed_iters: int  # iterations in ms_per_iter (the first step and evaluations excluded)
    first_step_s: float | None


TrainEvent = TrainStart | TrainStep | Evaluated | Saved | TrainEnd


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the run stopped at `step`; what is on disk is the checkpoint
    of the last evaluation (nothing is saved on interrupt: see `loop`)."""

    def __init__(self, out: Path, step: int):
        super().__init__(f"interrupted at step {step}")
        self.out, self.step = out, step


# ---- one run: setup, batches, evaluation, saving, the loop ------------------------------------


@dataclass
class Run:
    """Everything a training run holds between steps."""

    cfg: RunConfig
    backend: Any
    model: Any
    opt: Any
    spec: ModelSpec
    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]
    rng: np.random.Generator  # the batch stream; its state is saved in every checkpoint
    start: int  # the step this process starts from
    resumed: bool
    history: dict = field(default_factory=dict)  # the last evaluation's losses
    extra_config: dict = field(default_factory=dict)
    world: distributed.World = field(default_factory=distributed.World)
    train_dtype: str = "fp32"  # the step's precision, train.dtype resolved (dtypes())
    eval_dtype: str = "fp32"  # the loss estimates' forward precision

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.out)


def _check(tc: TrainConfig) -> None:
    if tc.grad_accum < 1 or tc.batch_size < 1 or tc.max_iters < 0:
        raise PolygptError("train.batch_size and train.grad_accum must be >= 1")


def dtypes(tc: TrainConfig, backend) -> tuple[str, str]:
    """The training step's and the evaluation forward's precisions: `auto` is the backend's
    fast choice for the step, and the step's for the evaluation."""
    if tc.dtype != "auto" and tc.dtype not in backend.train_dtypes:
        *rest, last = ("auto", *backend.train_dtypes)
        raise PolygptError(
            f"train.dtype must be {', '.join(rest)} or {last} ({backend.name}), got {tc.dtype!r}"
        )
    if tc.eval_dtype not in ("auto", "fp32", "bf16"):
        raise PolygptError(f"train.eval_dtype must be auto, fp32 or bf16, got {tc.eval_dtype!r}")
    train_dtype = backend.auto_dtype() if tc.dtype == "auto" else tc.dtype
    return train_dtype, train_dtype if tc.eval_dtype == "auto" else tc.eval_dtype


def setup(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    extra_config: dict | None = None,
    backend: Any = None,
    world: distributed.World | None = None,
) -> Run:
    """A new run (fresh weights at cfg.train.seed, or a checkpoint's with train.init_from) or,
    with `resume`, the run saved in cfg.train.out: its weights, AdamW state, batch stream and
    step. `backend` and `world` default to cfg's backend in one process."""
    tc = cfg.train
    _check(tc)
    out = Path(tc.out)
    backend = backend or get_backend(tc.backend, tc.device)
    train_dtype, eval_dtype = dtypes(tc, backend)
    world = world or distributed.World()
    if world.is_main:
        atomic.recover(out)
    world.barrier("waiting for rank 0 to recover the checkpoint directory")
    tokenizer = data.load_tokenizer(cfg.data.dir)
    splits = {name: data.load_split(cfg.data.dir, name) for name in ("train", "val")}
    if resume:
        spec, model, opt, rng, start, history = _resumed(cfg, backend, tokenizer, splits)
    else:
        spec, model, opt, rng, start, history = _fresh(cfg, backend, tokenizer, overwrite, world)
    world.prepare(backend, model, opt)  # rank 0's weights; gradients averaged across ranks
    return Run(
        cfg=cfg,
        backend=backend,
        model=model,
        opt=opt,
        spec=spec,
        tokenizer=tokenizer,
        splits=splits,
        rng=rng,
        start=start,
        resumed=resume,
        history=history,
        extra_config=dict(extra_config or {}),
        world=world,
        train_dtype=train_dtype,
        eval_dtype=eval_dtype,
    )


def _resumed(cfg: RunConfig, backend, tokenizer: Tokenizer, splits: dict) -> tuple:
    """(spec, model, opt, rng, start, history) of the run saved in cfg.train.out: its weights,
    AdamW state, batch stream and step, checked against the data it continues on."""
    out = Path(cfg.train.out)
    ckpt = checkpoints.read(out)
    if not ckpt.optimizer_file.exists():
        raise PolygptError(f"{out} has no optimizer.safetensors: it cannot be resumed")
    if ckpt.tokenizer != tokenizer.to_dict():
        raise PolygptError(f"the data in {cfg.data.dir} has another vocabulary than {out}")
    model = backend.load_model(ckpt.model, "fp32")
    opt = backend.make_optimizer(model, cfg.train)
    backend.load_optimizer(opt, ckpt.optimizer_file)
    state = ckpt.config.get("train_state", {})
    sizes = {name: len(arr) for name, arr in splits.items()}
    if state.get("data_tokens", sizes) != sizes:  # (older checkpoints lack it)
        raise PolygptError(
            f"data.dir {cfg.data.dir} holds other token files than {out} was trained on "
            f"({state['data_tokens']} tokens, now {sizes})"
        )
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = state["rng"]
    except (KeyError, TypeError, ValueError):
        raise PolygptError(f"{out}: no valid train_state.rng in config.json to resume") from None
    return ckpt.spec, model, opt, rng, ckpt.step, dict(ckpt.config.get("metrics", {}))


def _fresh(cfg: RunConfig, backend, tokenizer: Tokenizer, overwrite: bool, world) -> tuple:
    """(spec, model, opt, rng, start, history) of a new run: fresh weights at train.seed, or a
    checkpoint's with train.init_from, and a fresh optimizer."""
    tc, out = cfg.train, Path(cfg.train.out)
    if (out / checkpoints.CONFIG_FILE).exists() and not overwrite:
        raise PolygptError(
            f"{out} already holds a checkpoint: pass --resume to continue it, "
            "--overwrite to replace it, or --out to train elsewhere"
        )
    if tc.init_from:  # fine-tuning: spec and weights from a checkpoint, a fresh optimizer
        spec, model = load_init(backend, tc.init_from, tokenizer, cfg.model.dropout)
    else:
        spec = cfg.model.to_spec(tokenizer.vocab_size)
        if spec.vocab_size < tokenizer.vocab_size:
            raise PolygptError(
                f"model.vocab_size {spec.vocab_size} < the data's {tokenizer.vocab_size}"
            )
        model = backend.init_model(spec, tc.seed)
    opt = backend.make_optimizer(model, tc)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and (out / checkpoints.METRICS_FILE).exists():
            (out / checkpoints.METRICS_FILE).unlink()
    return spec, model, opt, np.random.default_rng(tc.seed), 0, {}


def draw_batches(run: Run) -> list[tuple[np.ndarray, np.ndarray]]:
    """One optimizer step's global batch: grad_accum micro-batches from the run's stream."""
    tc = run.cfg.train
    return [
        data.get_batch(run.splits["train"], run.spec.block_size, tc.batch_size, run.rng)
        for _ in range(tc.grad_accum)
    ]


def evaluate(run: Run, step: int) -> Evaluated:
    """Train/val loss estimates on fixed batches, recorded in metrics.jsonl."""
    tc = run.cfg.train
    t0 = time.perf_counter()
    losses = estimate_loss(
        run.backend,
        run.model,
        run.splits,
        run.spec.block_size,
        tc.batch_size,
        tc.eval_iters,
        tc.seed,
        run.spec.vocab_size,
        run.eval_dtype,
    )
    ev = Evaluated(
        step=step,
        train_loss=losses["train"],
        val_loss=losses["val"],
        val_ppl=math.exp(losses["val"]),
        lr=get_lr(step, tc),
        eval_s=round(time.perf_counter() - t0, 4),
    )
    metrics_log.append(run.out, {"event": "eval", **vars(ev), "time": time.time()})
    run.history = {"train_loss": ev.train_loss, "val_loss": ev.val_loss, "val_ppl": ev.val_ppl}
    return ev


def save(run: Run, step: int) -> Saved | None:
    """Write the checkpoint (weights, AdamW state, batch-stream state, last metrics)."""
    if not run.cfg.train.save_checkpoints or not run.world.is_main:
        return None
    spec, backend = run.spec, run.backend
    run_cfg = run.cfg.to_dict()
    run_cfg["model"] = spec.to_dict()
    config = {
        "polygpt_version": __version__,
        "spec": spec.to_dict(),
        "tokenizer": {k: v for k, v in run.tokenizer.to_dict().items() if k != "chars"},
        "run": run_cfg,
        "step": step,
        "precision": "fp32",
        "backend": backend.name,
        "device": backend.device,
        "metrics": run.history,
        "train_state": {
            "rng": run.rng.bit_generator.state,
            "data_tokens": {name: len(arr) for name, arr in run.splits.items()},
        },
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **run.extra_config,
    }
    meta = modelfile.metadata(spec, step=str(step))
    checkpoints.write(
        run.out,
        config=config,
        tokenizer=run.tokenizer.to_dict(),
        save_model=lambda p: backend.save_model(run.model, p, meta),
        save_optimizer=lambda p: backend.save_optimizer(run.opt, p, {"format": "polygpt-adamw"}),
    )
    return Saved(step, run.out)


@dataclass
class _Clock:
    """Training time with evaluations left out; the first step (it allocates and, with
    train.compile, compiles) is timed apart, not in ms/iter."""

    train_s: float = 0.0
    timed_iters: int = 0
    first_step_s: float | None = None
    t0: float = field(default_factory=time.perf_counter)

    def stop(self) -> None:
        self.train_s += time.perf_counter() - self.t0

    def restart(self) -> None:
        self.t0 = time.perf_counter()

    def stepped(self) -> None:
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.t0
            self.restart()
        else:
            self.timed_iters += 1


def loop(run: Run, on_event: Callable[[TrainEvent], None] = lambda ev: None) -> TrainResult:
    """Train from run.start to max_iters, evaluating and saving every eval_interval steps.

    Ctrl-C raises TrainInterrupted and saves nothing: the interrupt can land inside a step
    (between parameter updates), and a checkpoint of that state is one no unbroken run passes
    through, which would break "a resumed run equals the unbroken run". The checkpoint on disk
    stays the last evaluated one (at most eval_interval steps behind)."""
    tc, world = run.cfg.train, run.world
    if not world.is_main:  # rank 0 alone reports
        on_event = lambda ev: None  # noqa: E731
    desc = _announce(run, on_event)
    t_start = time.perf_counter()
    clock = _Clock()
    it, loss = run.start, None
    try:
        while True:
            at_eval = it % tc.eval_interval == 0 or it == tc.max_iters
            if at_eval and (it > run.start or not run.resumed):  # resumed: evaluated when saved
                if loss is not None:
                    world.sync(loss)  # finish queued work before the clock stops
                clock.stop()
                _evaluate_and_save(run, it, on_event)
                clock.restart()
            if it >= tc.max_iters:
                break
            lr = get_lr(it, tc)
            loss = _train_step(run, lr, clock)
            it += 1
            on_event(TrainStep(it, lr, _log_step(run, it, lr, loss)))
    except KeyboardInterrupt:
        raise TrainInterrupted(run.out, it) from None
    result = _result(run, it, clock, time.perf_counter() - t_start, desc)
    on_event(TrainEnd(result, clock.timed_iters, clock.first_step_s))
    return result


def _announce(run: Run, on_event: Callable[[TrainEvent], None]) -> dict[str, str]:
    """Report the start, and record in metrics.jsonl how many processes run this segment and
    over what; returns the backend's description."""
    tc, spec, backend, world = run.cfg.train, run.spec, run.backend, run.world
    desc = backend.describe()
    on_event(
        TrainStart(
            out=run.out,
            step=run.start,
            max_iters=tc.max_iters,
            resumed=run.resumed,
            params=spec.num_params(),
            params_total=spec.num_params(False),
            backend=backend.name,
            device=backend.device,
            describe=desc,
            processes=world.describe(),
            dtype=run.train_dtype,
            eval_dtype=run.eval_dtype,
        )
    )
    if world.is_main:
        record = {"event": "start", "step": run.start, **world.record()}
        record.update(dtype=run.train_dtype, eval_dtype=run.eval_dtype, time=time.time())
        metrics_log.append(run.out, record)
    return desc


def _evaluate_and_save(run: Run, it: int, on_event: Callable[[TrainEvent], None]) -> None:
    world = run.world
    if world.is_main:
        on_event(evaluate(run, it))
        with world.saving:
            saved = save(run, it) if it > 0 else None
        if saved is not None:
            on_event(saved)
    world.barrier("waiting for rank 0 to evaluate and save")


def _train_step(run: Run, lr: float, clock: _Clock) -> Any:
    """One optimizer step on this rank's slice of the global batch; its loss, not synced."""
    tc, world = run.cfg.train, run.world
    batches = world.shard(draw_batches(run))  # every rank draws the global batch
    first = clock.first_step_s is None
    # (its collectives wait for the peers; the first step also compiles, on every rank)
    with world.deadline("in a training step", first=first):
        loss = run.backend.train_step(
            run.model, run.opt, batches, lr, tc.grad_clip, run.train_dtype
        )
    if first:
        with world.deadline("finishing the first training step", first=True):
            float(loss)  # waits for the queued step
    clock.stepped()
    return loss


def _log_step(run: Run, it: int, lr: float, loss: Any) -> float | None:
    """The loss at log_interval steps (and the last), recorded in metrics.jsonl; else None."""
    tc = run.cfg.train
    if it % tc.log_interval != 0 and it != tc.max_iters:
        return None
    lossf = run.world.mean(loss)  # the only host sync between evaluations
    if run.world.is_main:
        metrics_log.append(run.out, {"event": "train", "step": it, "loss": lossf, "lr": lr})
    return lossf


def _result(run: Run, it: int, clock: _Clock, wall: float, desc: dict) -> TrainResult:
    tc = run.cfg.train
    ms = 1000 * clock.train_s / max(1, clock.timed_iters)
    tokens_per_iter = tc.batch_size * tc.grad_accum * run.spec.block_size
    return TrainResult(
        out=run.out,
        step=it,
        train_loss=run.history.get("train_loss"),
        val_loss=run.history.get("val_loss"),
        ms_per_iter=ms,
        tokens_per_s=tokens_per_iter / (ms / 1000) if ms > 0 else 0.0,
        wall_s=wall,
        backend=desc,
        is_main=run.world.is_main,
    )


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    extra_config: dict | None = None,
    on_event: Callable[[TrainEvent], None] = lambda ev: None,
) -> TrainResult:
    """Train (or resume) the run described by `cfg`; `extra_config` entries are stored in
    every checkpoint's config.json (e.g. a sweep's fingerprint)."""
    tc = cfg.train
    _check(tc)
    # under torchrun / mlx.launch: a launcher's SIGTERM is said from here on; then join the
    # group (or fail); rank 0 alone writes and reports
    world = distributed.arrive(tc)
    backend = get_backend(tc.backend, tc.device)
    distributed.join(world, backend, tc)
    try:
        # one writer per --out (rank 0's lock); a killed run's leftovers cleaned first
        owner = rundir.owned(tc.out, resume) if world.is_main else contextlib.nullcontext()
        with world.guard(), owner:
            run = setup(
                cfg,
                resume=resume,
                overwrite=overwrite,
                extra_config=extra_config,
                backend=backend,
                world=world,
            )
            return loop(run, on_event)
    finally:
        world.close()


# Keys an override cannot change on --resume: the checkpoint's weights fix the model.
_FIXED_ON_RESUME = ("model",)


def config_for_resume(out: str | Path, overrides: list[str]) -> RunConfig:
    """The run config stored in a checkpoint, with command-line overrides on top; an override
    of a model key to another value is an error naming it (the weights fix the model)."""
    ckpt = checkpoints.read(out)
    cfg = from_dict(dict(ckpt.config.get("run", {})))
    cfg.train.out = str(out)
    for item in overrides:
        section, key, value = parse_override(item)
        before = cfg.to_dict()[section] if section in _FIXED_ON_RESUME else None
        cfg.set(section, key, value)
        if before is not None and getattr(getattr(cfg, section), key) != before[key]:
            raise PolygptError(
                f"{section}.{key} cannot change on --resume (the checkpoint's model has "
                f"{key}={before[key]!r}): train a new run with --out DIR instead"
            )
    return cfg
