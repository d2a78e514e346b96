"""The training loop, written once for every backend.

nanoGPT's recipe: AdamW with weight decay on 2-D tensors, linear warmup then cosine decay to
min_lr, gradient clipping, periodic train/val loss estimates on fixed batches, a checkpoint at
each evaluation. Batches come from a seeded NumPy generator whose state is saved with the
checkpoint, so a resumed run (in either backend) sees the same batch stream as an unbroken one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from polygpt import __version__, data, distributed, rundir, weights
from polygpt.backends import get_backend
from polygpt.config import RunConfig, TrainConfig, from_dict
from polygpt.errors import PolygptError

# estimate_loss stacks batches into forwards of at most this many positions and logits
_EVAL_POSITIONS = 8192
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
) -> dict[str, float]:
    """Mean loss over `iters` batches per split; the batches depend only on (seed, split).

    With `vocab_size`, equal batches are stacked into one forward of up to ~8k positions (and
    at most 64M logits): the same mean over the same tokens in fewer, larger calls."""
    group = 1
    if vocab_size > 0:
        rows = batch_size * block_size
        group = max(1, min(iters, _EVAL_POSITIONS // rows, _EVAL_LOGITS // (rows * vocab_size)))
    out = {}
    for i, (name, arr) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, i])
        batches = [data.get_batch(arr, block_size, batch_size, rng) for _ in range(iters)]
        total = 0.0
        for j in range(0, iters, group):
            chunk = batches[j : j + group]
            x = np.concatenate([b[0] for b in chunk])
            y = np.concatenate([b[1] for b in chunk])
            total += backend.eval_loss(model, x, y) * len(chunk)  # mean of equal batches
        out[name] = total / iters
    return out


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    extra_config: dict | None = None,
) -> TrainResult:
    """Train (or resume) the run described by `cfg`; `extra_config` entries are stored in
    every checkpoint's config.json (e.g. a sweep's fingerprint)."""
    tc = cfg.train
    if tc.grad_accum < 1 or tc.batch_size < 1 or tc.max_iters < 0:
        raise PolygptError("train.batch_size and train.grad_accum must be >= 1")
    if tc.dtype not in ("fp32", "bf16"):
        raise PolygptError(f"train.dtype must be fp32 or bf16, got {tc.dtype!r}")
    backend = get_backend(tc.backend, tc.device)
    # under torchrun / mlx.launch: join the group (or fail); rank 0 alone writes and logs
    world = distributed.join(backend, tc)
    try:
        # one writer per --out (rank 0's lock); a killed run's leftovers cleaned first
        owner = rundir.owned(tc.out, resume) if world.is_main else contextlib.nullcontext()
        with world.guard(), owner:
            return _train(cfg, backend, world, resume, overwrite, progress, log, extra_config)
    finally:
        world.close()


def _train(cfg, backend, world, resume, overwrite, progress, log, extra_config) -> TrainResult:
    tc = cfg.train
    out = Path(tc.out)
    log, progress = world.log(log), progress and world.is_main
    if world.is_main:
        weights.recover(out)
    world.barrier("waiting for rank 0 to recover the checkpoint directory")
    tokenizer = data.load_tokenizer(cfg.data.dir)
    splits = {name: data.load_split(cfg.data.dir, name) for name in ("train", "val")}

    if resume:
        ckpt = weights.read_checkpoint(out)
        if not ckpt.optimizer_file.exists():
            raise PolygptError(f"{out} has no optimizer.safetensors: it cannot be resumed")
        if ckpt.tokenizer != tokenizer.to_dict():
            raise PolygptError(f"the data in {cfg.data.dir} has another vocabulary than {out}")
        spec = ckpt.spec
        model = backend.load_model(spec, ckpt.model_file, "fp32")
        opt = backend.make_optimizer(model, tc)
        backend.load_optimizer(opt, ckpt.optimizer_file)
        start = ckpt.step
        state = ckpt.config.get("train_state", {})
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError):
            raise PolygptError(
                f"{out}: no valid train_state.rng in config.json to resume"
            ) from None
        history = dict(ckpt.config.get("metrics", {}))
        log(f"resuming {out} at step {start} with {backend.name} on {backend.device}")
    else:
        if (out / weights.CONFIG_FILE).exists() and not overwrite:
            raise PolygptError(
                f"{out} already holds a checkpoint: pass --resume to continue it, "
                "--overwrite to replace it, or --out to train elsewhere"
            )
        if tc.init_from:  # fine-tuning: spec and weights from a checkpoint, a fresh optimizer
            from polygpt.finetune import load_init

            spec, model = load_init(backend, tc.init_from, tokenizer, cfg.model.dropout)
        else:
            spec = cfg.model.to_spec(tokenizer.vocab_size)
            if spec.vocab_size < tokenizer.vocab_size:
                raise PolygptError(
                    f"model.vocab_size {spec.vocab_size} < the data's {tokenizer.vocab_size}"
                )
            model = backend.init_model(spec, tc.seed)
        opt = backend.make_optimizer(model, tc)
        start = 0
        rng = np.random.default_rng(tc.seed)
        history = {}
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if overwrite and (out / weights.METRICS_FILE).exists():
                (out / weights.METRICS_FILE).unlink()
    world.prepare(backend, model, opt)  # rank 0's weights; gradients averaged across ranks

    desc = backend.describe()
    log(
        f"{spec.num_params() / 1e6:.2f}M parameters (non-embedding; {spec.num_params(False):,} "
        f"total) | {desc['framework']} on {desc['device']} ({desc['device_name']}) "
        f"| BLAS: {desc['blas']} | {world.describe()}"
    )
    if world.is_main:  # each run segment says how many processes ran it, and over what
        weights.append_metrics(
            out, {"event": "start", "step": start, **world.record(), "time": time.time()}
        )

    def save(step: int, metrics: dict) -> None:
        if not tc.save_checkpoints:
            return
        run_cfg = cfg.to_dict()
        run_cfg["model"] = {k: v for k, v in spec.to_dict().items()}
        config = {
            "polygpt_version": __version__,
            "spec": spec.to_dict(),
            "tokenizer": {k: v for k, v in tokenizer.to_dict().items() if k != "chars"},
            "run": run_cfg,
            "step": step,
            "precision": "fp32",
            "backend": backend.name,
            "device": backend.device,
            "metrics": metrics,
            "train_state": {"rng": rng.bit_generator.state},
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra_config or {}),
        }
        meta = weights.model_metadata(spec, step=str(step))
        weights.write_checkpoint(
            out,
            config=config,
            tokenizer=tokenizer.to_dict(),
            save_model=lambda p: backend.save_model(model, p, meta),
            save_optimizer=lambda p: backend.save_optimizer(opt, p, {"format": "polygpt-adamw"}),
        )

    def evaluate(step: int) -> dict:
        losses = estimate_loss(
            backend,
            model,
            splits,
            spec.block_size,
            tc.batch_size,
            tc.eval_iters,
            tc.seed,
            spec.vocab_size,
        )
        rec = {
            "event": "eval",
            "step": step,
            "train_loss": losses["train"],
            "val_loss": losses["val"],
            "val_ppl": math.exp(losses["val"]),
            "lr": get_lr(step, tc),
            "time": time.time(),
        }
        weights.append_metrics(out, rec)
        return rec

    tokens_per_iter = tc.batch_size * tc.grad_accum * spec.block_size
    train_time, timed_iters = 0.0, 0
    first_step_s = None
    last = history
    t_start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.max_iters, initial=start, unit="it", dynamic_ncols=True, leave=True)
    it = start
    t0 = time.perf_counter()
    loss = None
    while True:
        at_eval = it % tc.eval_interval == 0 or it == tc.max_iters
        if at_eval and (it > start or not resume):  # a resumed run was evaluated when saved
            if loss is not None:
                world.sync(loss)  # finish queued work before the clock stops
            train_time += time.perf_counter() - t0
            if world.is_main:
                rec = evaluate(it)
                last = {k: rec[k] for k in ("train_loss", "val_loss", "val_ppl")}
                msg = (
                    f"step {it}: train loss {rec['train_loss']:.4f}, val loss "
                    f"{rec['val_loss']:.4f}, val ppl {rec['val_ppl']:.3f}"
                )
                (bar.write if bar else log)(msg)
                if it > 0:
                    save(it, last)
            world.barrier("waiting for rank 0 to evaluate and save")
            t0 = time.perf_counter()
        if it >= tc.max_iters:
            break
        lr = get_lr(it, tc)
        batches = [
            data.get_batch(splits["train"], spec.block_size, tc.batch_size, rng)
            for _ in range(tc.grad_accum)
        ]
        batches = world.shard(batches)  # every rank drew the global batch; this is its slice
        with world.deadline("in a training step"):  # (its collectives wait for the peers)
            loss = backend.train_step(model, opt, batches, lr, tc.grad_clip, tc.dtype)
        it += 1
        if first_step_s is None:
            # the first step allocates and, with train.compile, compiles: not part of ms/iter
            world.sync(loss)
            first_step_s = time.perf_counter() - t0
            t0 = time.perf_counter()
        else:
            timed_iters += 1
        if it % tc.log_interval == 0 or it == tc.max_iters:
            lossf = world.mean(loss)  # the only host sync between evaluations
            if world.is_main:
                weights.append_metrics(out, {"event": "train", "step": it, "loss": lossf, "lr": lr})
            if bar:
                bar.set_postfix(loss=f"{lossf:.4f}", lr=f"{lr:.2e}", refresh=False)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    wall = time.perf_counter() - t_start
    ms = 1000 * train_time / max(1, timed_iters)
    tps = tokens_per_iter / (ms / 1000) if ms > 0 else 0.0
    if timed_iters:
        log(
            f"trained {timed_iters} iterations: {ms:.1f} ms/iter, {tps:,.0f} tokens/s "
            f"(evaluation and the first step, {first_step_s:.1f}s, excluded), {wall:.1f}s wall"
        )
    return TrainResult(
        out=out,
        step=it,
        train_loss=last.get("train_loss"),
        val_loss=last.get("val_loss"),
        ms_per_iter=ms,
        tokens_per_s=tps,
        wall_s=wall,
        backend=desc,
        is_main=world.is_main,
    )


def config_for_resume(out: str | Path, overrides: list[str]) -> RunConfig:
    """The run config stored in a checkpoint, with command-line overrides on top."""
    from polygpt.config import apply_override

    ckpt = weights.read_checkpoint(out)
    stored = dict(ckpt.config.get("run", {}))
    cfg = from_dict(stored)
    cfg.train.out = str(out)
    for item in overrides:
        apply_override(cfg, item)
    return cfg
