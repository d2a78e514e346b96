"""nanoGPT's own recipe at several seeds, for the seed-spread table in docs/EXPERIMENTS.md.

    .venv/bin/python scripts/nanogpt_seeds.py --seeds 1337 1 2 --out weights/nanogpt_seeds

Unlike scripts/bench_train.py (same weights and batches as polygpt, to compare step speed and
numerics), each run here is nanoGPT's train.py end to end with its own random streams:
`torch.manual_seed(seed)`, its `_init_weights` (normal 0.02, zero biases, c_proj scaled by
1/sqrt(2 n_layer)), its `get_batch` (`torch.randint` offsets from the global generator, shared
with `estimate_loss`), its LR schedule, AdamW and clipping, and its `estimate_loss` (eval_iters
batches per split, model.eval()) every eval_interval steps. The config is the reference one
(configs/shakespeare_char.toml: the nanoGPT README's CPU settings). nanoGPT's loop takes one
extra step after the last evaluation; we stop at max_iters so the saved model is the evaluated one.

Each run is saved the way nanoGPT saves it (`ckpt.pt`: a torch.save dict with `model` and
`model_args`) and then goes through polygpt's own import path, `polygpt convert` (which reads it
with `torch.load(weights_only=True)`) and `polygpt eval` (full val split), so the full-split NLL
is computed by the same code as polygpt's runs. Results: <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanogpt import NanoGPT  # noqa: E402  (scripts/nanogpt.py: nanoGPT's model.py)

from polygpt import config, data  # noqa: E402


def nanogpt_init(model: NanoGPT, n_layer: int) -> None:
    """nanoGPT GPT.__init__: apply(_init_weights), then the scaled c_proj init."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
    for pn, p in model.named_parameters():
        if pn.endswith("c_proj.weight"):
            torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


def get_lr(it: int, tc) -> float:
    """nanoGPT train.py's get_lr."""
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / (tc.warmup_iters + 1)
    if it > tc.lr_decay_iters:
        return tc.min_lr
    ratio = (it - tc.warmup_iters) / (tc.lr_decay_iters - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.lr - tc.min_lr)


def train_seed(seed: int, cfg, splits, run_dir: Path) -> dict:
    """nanoGPT train.py's loop: an `estimate_loss` every eval_interval, then (after step 0) its
    checkpoint, written when the val loss improved (always_save_checkpoint = False, as its
    shakespeare_char config): model, AdamW state, model_args. Per evaluation: the time at its
    end and its duration."""
    torch.manual_seed(seed)
    spec = cfg.model.to_spec(65)
    model = NanoGPT(spec)
    nanogpt_init(model, spec.n_layer)
    tc = cfg.train
    opt = model.configure_optimizers(tc.weight_decay, tc.lr, (tc.beta1, tc.beta2), "cpu")
    bs, T = tc.batch_size, spec.block_size
    model_args = {
        k: getattr(spec, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")
    }
    model_args["vocab_size"] = spec.vocab_size
    model_args["dropout"] = 0.0
    run_dir.mkdir(parents=True, exist_ok=True)

    def get_batch(split):
        arr = splits[split]
        ix = torch.randint(len(arr) - T, (bs,))
        x = torch.stack([torch.from_numpy(arr[i : i + T].astype("int64")) for i in ix])
        y = torch.stack([torch.from_numpy(arr[i + 1 : i + 1 + T].astype("int64")) for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        res = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(tc.eval_iters)
            for k in range(tc.eval_iters):
                _, loss = model(*get_batch(split))
                losses[k] = loss.item()
            res[split] = losses.mean().item()
        model.train()
        return res

    t0 = time.perf_counter()
    history = []
    best_val = 1e9
    x, y = get_batch("train")
    it = 0
    while True:
        lr = get_lr(it, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        if it % tc.eval_interval == 0:
            t_eval = time.perf_counter()
            losses = estimate_loss()
            now = time.perf_counter()
            history.append({"step": it, **losses, "time": now, "eval_s": now - t_eval})
            print(f"seed {seed} step {it}: train {losses['train']:.4f}, val {losses['val']:.4f}")
            if losses["val"] < best_val:
                best_val = losses["val"]
                if it > 0:  # nanoGPT's checkpoint (a pickle, as nanoGPT writes it)
                    ckpt = {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "model_args": model_args,
                        "iter_num": it,
                        "best_val_loss": best_val,
                    }
                    torch.save(ckpt, run_dir / "ckpt.pt")
        if it >= tc.max_iters:
            break
        _, loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        it += 1
    wall = time.perf_counter() - t0
    return {
        "model": model,
        "model_args": model_args,
        "history": history,
        "iters": it,
        "wall_s": wall,
    }


def run_seed(seed: int, cfg, splits, out: Path) -> dict:
    run_dir = out / f"seed{seed}"
    r = train_seed(seed, cfg, splits, run_dir)
    history = r["history"]
    # the evaluated final model in nanoGPT's format; polygpt reads it safely
    torch.save(
        {"model": r["model"].state_dict(), "model_args": r["model_args"], "iter_num": r["iters"]},
        run_dir / "ckpt.pt",
    )
    pg = [sys.executable, "-c", "from polygpt.cli import main; main()"]
    conv = run_dir / "polygpt"
    subprocess.run(
        [*pg, "convert", str(run_dir / "ckpt.pt"), str(conv), "--tokenizer", cfg.data.dir],
        check=True,
    )
    ev = subprocess.run(
        [*pg, "eval", str(conv), "--backend", "torch", "--data", cfg.data.dir, "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    full = json.loads(ev.stdout)
    return {
        "seed": seed,
        "train_loss": history[-1]["train"],
        "val_loss": history[-1]["val"],
        "val_nll_full": full.get("nll"),
        "val_ppl_full": full.get("perplexity"),
        "wall_s": r["wall_s"],
        "history": history,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    ap.add_argument("--config", default=str(ROOT / "configs" / "shakespeare_char.toml"))
    ap.add_argument("--out", default="weights/nanogpt_seeds")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value (smoke tests)")
    args = ap.parse_args()
    cfg = config.load(args.config, args.overrides)
    splits = {s: data.load_split(cfg.data.dir, s) for s in ("train", "val")}
    out = Path(args.out)
    results = [run_seed(s, cfg, splits, out) for s in args.seeds]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(
            f"seed {r['seed']}: val loss {r['val_loss']:.4f} (estimate), "
            f"full-split NLL {r['val_nll_full']}"
        )


if __name__ == "__main__":
    main()
