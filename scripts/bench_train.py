"""Training-step speed: nanoGPT's step against polygpt's torch backend, side by side.

    .venv/bin/python scripts/bench_train.py [--iters 100] [--variants nanogpt,polygpt,...]

(a) `nanogpt`: a faithful, compact copy of nanoGPT's model.py (scripts/nanogpt.py) and
    train.py step (exact-erf GELU, its CausalSelfAttention with SDPA, bias False, tied lm_head,
    AdamW without `fused` as nanoGPT configures it off CUDA, clip_grad_norm_ with its defaults,
    batches stacked from per-row `torch.from_numpy` as its get_batch does).
(b) `polygpt`: polygpt's torch backend `train_step` (the exact code `polygpt train` runs).
Modifiers: `+compile` (train.compile / torch.compile of nanoGPT's model), `+bf16` (polygpt's
bf16 autocast: it changes the numbers, report it separately), `@N` (N CPU threads; default:
torch's default for nanoGPT, `train.threads = 0`, the timed auto choice, for polygpt).

All variants start from the same weights (polygpt's init, loaded into the nanoGPT model by
name) and see the same batches; steps are interleaved (A B A B ...) so a noisy, shared machine
slows them alike, and the median over iterations is reported with the 10th/90th percentiles.
The config is the reference experiment (configs/shakespeare_char.toml) unless --config says.
This is a benchmark, not product code: it imports torch directly and times wall clock.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_THREADS = torch.get_num_threads()
sys.path.insert(0, str(ROOT))

from nanogpt import NanoGPT  # noqa: E402  (scripts/nanogpt.py: nanoGPT's model)

from polygpt import config, data  # noqa: E402
from polygpt.backends import get_backend  # noqa: E402


class NanoStep:
    """nanoGPT train.py's inner loop for one iteration (grad_accum 1, CPU: nullcontext)."""

    def __init__(self, spec, tc, init_state, compile_: bool = False, threads: int = 0):
        self.model = NanoGPT(spec)
        state = dict(init_state)
        state["lm_head.weight"] = state["transformer.wte.weight"]
        self.model.load_state_dict(state, strict=True)
        self.opt = self.model.configure_optimizers(
            tc.weight_decay, tc.lr, (tc.beta1, tc.beta2), "cpu"
        )
        self.fwd = torch.compile(self.model) if compile_ else self.model
        self.grad_clip = tc.grad_clip
        self.threads = threads or DEFAULT_THREADS  # nanoGPT leaves torch's default

    def __call__(self, arr, ix, block_size, lr):
        torch.set_num_threads(self.threads)  # (another variant may have changed it)
        # nanoGPT get_batch: one from_numpy per row, then stack
        x = torch.stack([torch.from_numpy(arr[i : i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(arr[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix]
        )
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        _, loss = self.fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    @torch.no_grad()
    def eval_loss(self, x, y) -> float:
        self.model.eval()  # nanoGPT's estimate_loss
        _, loss = self.model(
            torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
        )
        return loss.item()


class PolyStep:
    """polygpt's torch backend train_step, exactly as the training loop calls it."""

    def __init__(
        self, spec, tc, init_state, dtype: str = "fp32", compile_: bool = False, threads: int = 0
    ):
        tc = config.TrainConfig(
            **{**tc.__dict__, "dtype": dtype, "compile": compile_, "threads": threads}
        )
        self.backend = get_backend("torch", "cpu")
        self.model = self.backend.init_model(spec, 0)
        self.model.load_state_dict(init_state, strict=True)
        self.opt = self.backend.make_optimizer(self.model, tc)
        self.tc = tc

    def __call__(self, arr, ix, block_size, lr):
        if self.tc.threads:
            torch.set_num_threads(self.tc.threads)  # (the auto setting re-applies its own)
        x, y = _batch(arr, ix, block_size)
        return self.backend.train_step(
            self.model, self.opt, [(x, y)], lr, self.tc.grad_clip, self.tc.dtype
        )

    def eval_loss(self, x, y) -> float:
        return self.backend.eval_loss(self.model, x, y)

    def note(self) -> str:
        t = self.opt.threads
        parts = []
        if t is not None:
            parts.append(f"auto threads chose {t.chosen} (checks: {t.history})")
        if self.opt.compile_error:
            parts.append(f"compile failed: {self.opt.compile_error}")
        return "; ".join(parts)


def make_step(name: str, spec, tc, init):
    """`nanogpt` or `polygpt`, then any of `+compile`, `+bf16` (polygpt), `@N` (threads)."""
    base, _, threads = name.partition("@")
    kind, *flags = base.split("+")
    unknown = set(flags) - {"compile", "bf16"}
    if kind not in ("nanogpt", "polygpt") or unknown or (kind == "nanogpt" and "bf16" in flags):
        raise ValueError(name)
    n = int(threads) if threads else 0
    if kind == "nanogpt":
        return NanoStep(spec, tc, init, compile_="compile" in flags, threads=n)
    return PolyStep(
        spec,
        tc,
        init,
        dtype="bf16" if "bf16" in flags else "fp32",
        compile_="compile" in flags,
        threads=n,
    )


def _batch(arr, ix, block_size):
    chunk = arr[ix[:, None] + np.arange(block_size + 1)].astype(np.int32)  # as data.get_batch
    return chunk[:, :-1], chunk[:, 1:]


def _environment() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"torch {torch.__version__}, {cpu}, {os.cpu_count()} cores, "
        f"torch threads {DEFAULT_THREADS} by default, load average {load}"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "shakespeare_char.toml"))
    ap.add_argument("--data", default=None, help="prepared data dir [the config's data.dir]")
    ap.add_argument("--iters", type=int, default=100, help="timed iterations per variant")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="split the timed iterations into this many rounds; the speed-up reported is the "
        "median of the rounds' (each round's median step time against the baseline's)",
    )
    ap.add_argument(
        "--variants",
        default="nanogpt,polygpt",
        help="comma list of nanogpt|polygpt, then +compile, +bf16 (polygpt), @N "
        "threads (default: nanogpt torch's default, polygpt its auto choice); "
        "the first is the baseline",
    )
    ap.add_argument(
        "--eval",
        action="store_true",
        help="afterwards, each variant's val loss on the same eval_iters batches",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args(argv)

    cfg = config.load(args.config, args.overrides)
    data_dir = args.data or cfg.data.dir
    arr = data.load_split(data_dir, "train")
    spec = cfg.model.to_spec(data.load_tokenizer(data_dir).vocab_size)
    tc = cfg.train
    bs, T = tc.batch_size, spec.block_size
    init = {
        k: v.detach().clone()
        for k, v in get_backend("torch", "cpu").init_model(spec, tc.seed).state_dict().items()
    }

    names = args.variants.split(",")
    try:
        steps = {n: make_step(n, spec, tc, init) for n in names}
    except ValueError as e:
        ap.error(f"unknown variant {e}")
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, float] = {}
    rng = np.random.default_rng(tc.seed)
    n_total = args.warmup + args.iters
    print(_environment())
    print(
        f"{spec.n_layer} layers, {spec.n_head} heads, {spec.n_embd} embd, block {T}, "
        f"batch {bs}, {spec.activation} (nanoGPT: exact gelu); {args.iters} timed iterations "
        f"after {args.warmup} warm-up, interleaved"
    )
    from polygpt.train import get_lr

    for it in range(n_total):
        ix = rng.integers(0, len(arr) - T, size=bs)
        lr = get_lr(it, tc)
        order = names if it % 2 == 0 else names[::-1]  # alternate who goes first
        for n in order:
            t0, c0 = time.perf_counter(), time.process_time()
            loss = steps[n](arr, ix, T, lr)
            lf = loss.item()  # CPU ops are synchronous; this only reads the scalar
            if it >= args.warmup:
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
            losses[n] = lf
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    val_loss: dict[str, float] = {}
    if args.eval:  # the training loop's estimate: eval_iters seeded batches of the val split
        val = data.load_split(data_dir, "val")
        erng = np.random.default_rng([tc.seed, 1])
        batches = [data.get_batch(val, T, bs, erng) for _ in range(tc.eval_iters)]
        for n in names:
            val_loss[n] = float(np.mean([steps[n].eval_loss(x, y) for x, y in batches]))
    base = names[0]
    rounds = max(1, min(args.rounds, args.iters))
    per_round = {n: [float(np.median(c)) for c in np.array_split(wall[n], rounds)] for n in names}
    print(
        f"{'variant':<22}{'ms/iter':>9}{'p10':>8}{'p90':>8}{'cpu ms':>8}{'tokens/s':>10}"
        f"{'vs ' + base:>14}{'rounds':>22}{'loss@' + str(n_total):>11}"
        + ("  val loss" if val_loss else "")
    )
    for n in names:
        ms = 1000 * np.asarray(wall[n])
        med = float(np.median(ms))
        # speed-up: median over rounds of (baseline's median / this variant's median)
        ratios = [b / v for b, v in zip(per_round[base], per_round[n])]
        print(
            f"{n:<22}{med:9.2f}{np.percentile(ms, 10):8.2f}{np.percentile(ms, 90):8.2f}"
            f"{1000 * np.median(cpu[n]):8.2f}{bs * T / (med / 1000):10,.0f}"
            f"{float(np.median(ratios)):13.2f}x"
            f"{' '.join(f'{r:.2f}' for r in ratios):>22}{losses[n]:11.6f}"
            + (f"{val_loss[n]:10.4f}" if val_loss else "")
        )
    print(f"speed-up: median of {rounds} interleaved rounds (each round's ratio listed)")
    for n in names:
        note = steps[n].note() if isinstance(steps[n], PolyStep) else ""
        if note:
            print(f"{n}: {note}")
    if math.isnan(sum(losses.values())):
        sys.exit("a loss is NaN")


if __name__ == "__main__":
    main()
