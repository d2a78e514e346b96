"""Perplexity over a whole token split, exact and fast, written once for every backend.

Perplexity is exp(mean negative log-likelihood) over every target of the split, each scored
exactly once with as much left context as `block_size` allows. A split of N tokens has N-1
targets: the first token has no context and is not predicted (as in the Hugging Face perplexity
guide, https://huggingface.co/docs/transformers/perplexity).

Sliding windows (the default method). Every window has the same length L = min(block_size, N-1),
so windows batch into one (B, L) forward. The first window starts at token 0 and scores all L of
its positions (target j sees j tokens of context). Each later window ends `stride` targets after
the previous one (the tail window ends exactly at the last target, so it overlaps more and scores
fewer) and scores only the targets the previous windows did not: its last `stride` positions
(fewer in the tail). A target scored in a later window therefore sees between L-stride+1 and L
tokens of context. stride == block_size is the non-overlapping fast case; stride 1 gives every
target its full context at one forward per target.

The default stride is block_size // 2: every target past the first window keeps at least half a
block of context (3/4 of a block on average), for twice the cost of the non-overlapping pass and
block_size/2 times fewer forwards than scoring one window per target.

`method="last-token"` is the reference experiment's method, kept for comparison: one window per
target, scoring only its last position. That is the sliding schedule at stride 1 (the first
window's positions are scored together, which by causality equals feeding each prefix alone).

A backend supplies only `target_logprobs(model, x, y)` -> (B, L) float64; no logits tensor
leaves the framework. NumPy is used for token ids and those log-probs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from polygpt import checkpoints, data, inference, jsonfile
from polygpt.errors import PolygptError

METHODS = ("sliding", "last-token")
SPLITS = ("val", "train")
# Default batch: about this many positions per forward, and at most this many logits (floats)
# materialized inside the backend per batch (the (B, L, V) tensor a BPE vocabulary makes large).
_POSITIONS_PER_BATCH = 8192
_MAX_LOGITS = 1 << 26


@dataclass(frozen=True)
class WindowPlan:
    """The windows that score N-1 targets once each. Window k feeds tokens
    [starts[k], starts[k] + length) and scores its last n_scored[k] positions, i.e. the targets
    starts[k] + length - n_scored[k] + 1 ... starts[k] + length (target j is token j)."""

    starts: np.ndarray  # (W,) int64
    n_scored: np.ndarray  # (W,) int64
    length: int  # L = min(block_size, N - 1)

    @property
    def n_windows(self) -> int:
        return len(self.starts)

    @property
    def n_targets(self) -> int:
        return int(self.n_scored.sum())


def plan_windows(n_tokens: int, block_size: int, stride: int) -> WindowPlan:
    """Sliding windows of length min(block_size, N-1) covering targets 1..N-1 exactly once."""
    if n_tokens < 2:
        raise PolygptError(f"need at least 2 tokens to score one, got {n_tokens}")
    if block_size < 1:
        raise PolygptError(f"block_size must be >= 1, got {block_size}")
    if not 1 <= stride <= block_size:
        raise PolygptError(f"stride must be in [1, block_size={block_size}], got {stride}")
    L = min(block_size, n_tokens - 1)
    last = n_tokens - 1  # index of the last target
    # ends[k]: the last target window k scores; the first window scores targets 1..L.
    ends = np.concatenate([[L], np.arange(L + stride, last + stride, stride)]).astype(np.int64)
    ends[-1] = min(ends[-1], last)  # the tail window ends at the last target, scoring fewer
    n_scored = np.diff(ends, prepend=0)
    return WindowPlan(starts=ends - L, n_scored=n_scored, length=L)


def default_batch_size(block_size: int, vocab_size: int) -> int:
    """Windows per forward: ~8k positions, at most 64M logits inside the backend."""
    by_positions = _POSITIONS_PER_BATCH // max(1, block_size)
    by_logits = _MAX_LOGITS // max(1, block_size * vocab_size)
    return max(1, min(by_positions, by_logits))


@dataclass
class EvalProgress:
    """Reported after each batch of windows: `done` of `total` targets scored."""

    done: int
    total: int


def token_nll(
    backend: Any,
    model: Any,
    tokens: np.ndarray,
    block_size: int,
    stride: int,
    batch_size: int,
    on_progress: Callable[[EvalProgress], None] | None = None,
) -> np.ndarray:
    """Negative log-likelihood (nats, float64) of targets 1..N-1 of `tokens`, in order."""
    if batch_size < 1:
        raise PolygptError(f"batch size must be >= 1, got {batch_size}")
    plan = plan_windows(len(tokens), block_size, stride)
    L = plan.length
    offsets = np.arange(L + 1)
    pos = np.arange(L)
    out = np.empty(plan.n_targets, dtype=np.float64)
    filled = 0
    for i in range(0, plan.n_windows, batch_size):
        starts = plan.starts[i : i + batch_size]
        n = plan.n_scored[i : i + batch_size]
        chunk = np.asarray(tokens[starts[:, None] + offsets], dtype=np.int32)  # (B, L+1)
        lp = backend.target_logprobs(model, chunk[:, :-1], chunk[:, 1:])  # (B, L)
        keep = pos[None, :] >= (L - n)[:, None]  # each row's last n[b] positions
        vals = -np.asarray(lp, dtype=np.float64)[keep]  # row-major: in target order
        out[filled : filled + len(vals)] = vals
        filled += len(vals)
        if on_progress is not None:
            on_progress(EvalProgress(filled, plan.n_targets))
    if filled != plan.n_targets:  # pragma: no cover - the plan guarantees it
        raise RuntimeError(f"scored {filled} targets, expected {plan.n_targets}")
    return out


@dataclass
class EvalResult:
    """One perplexity evaluation. NLL in nats; the interval is exp(nll ± 1.96·se)."""

    perplexity: float
    nll: float
    nll_se: float  # std of per-token NLL / sqrt(n); tokens are correlated, so a lower bound
    ppl_low: float
    ppl_high: float
    bits_per_token: float
    bits_per_char: float | None  # char tokenizer: = bits_per_token; BPE: None
    tokens: int  # targets scored: N - 1 for N tokens
    tokens_per_s: float
    wall_s: float
    method: str
    stride: int
    block_size: int
    batch_size: int
    n_windows: int
    split: str = ""
    backend: str = ""
    device: str = ""
    precision: str = ""
    checkpoint: str = ""
    step: int | None = None
    per_token_nll: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("per_token_nll")
        return d


def summarize(nll: np.ndarray) -> dict[str, float]:
    """Mean NLL, its standard error, perplexity and its 95% interval, bits per token."""
    n = len(nll)
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "nll_se": se,
        "ppl_low": math.exp(mean - 1.96 * se),
        "ppl_high": math.exp(mean + 1.96 * se),
        "bits_per_token": mean / math.log(2),
    }


def perplexity(
    backend: Any,
    model: Any,
    tokens: np.ndarray,
    block_size: int,
    *,
    method: str = "sliding",
    stride: int | None = None,
    batch_size: int | None = None,
    vocab_size: int = 0,
    char_level: bool = False,
    on_progress: Callable[[EvalProgress], None] | None = None,
    keep_per_token: bool = False,
) -> EvalResult:
    """Perplexity of `tokens` (1-D ints) under `model`; see the module docstring."""
    if method not in METHODS:
        raise PolygptError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if method == "last-token":
        if stride not in (None, 1):
            raise PolygptError("--stride applies to the sliding method (last-token is stride 1)")
        stride = 1
    elif stride is None:
        stride = max(1, block_size // 2)
    if batch_size is None:
        batch_size = default_batch_size(block_size, vocab_size)
    plan = plan_windows(len(tokens), block_size, stride)  # validates before any work
    t0 = time.perf_counter()
    nll = token_nll(backend, model, tokens, block_size, stride, batch_size, on_progress)
    wall = time.perf_counter() - t0
    s = summarize(nll)
    return EvalResult(
        **s,
        bits_per_char=s["bits_per_token"] if char_level else None,
        tokens=len(nll),
        tokens_per_s=len(nll) / wall if wall > 0 else float("inf"),
        wall_s=wall,
        method=method,
        stride=stride,
        block_size=block_size,
        batch_size=batch_size,
        n_windows=plan.n_windows,
        backend=getattr(backend, "name", ""),
        device=getattr(backend, "device", ""),
        per_token_nll=nll if keep_per_token else None,
    )


def evaluate_checkpoint(
    path: str | Path,
    *,
    backend: str | None = None,
    device: str = "auto",
    precision: str | None = None,
    split: str = "val",
    data_dir: str | Path | None = None,
    max_tokens: int | None = None,
    method: str = "sliding",
    stride: int | None = None,
    batch_size: int | None = None,
    on_progress: Callable[[EvalProgress], None] | None = None,
) -> EvalResult:
    """Load a checkpoint and its prepared data (the run's data.dir unless `data_dir`) and
    evaluate the first `max_tokens` tokens of `split` (all of it by default)."""
    if split not in SPLITS:
        raise PolygptError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if max_tokens is not None and max_tokens < 2:
        raise PolygptError(
            f"--max-tokens must be >= 2 (N tokens give N-1 targets), got {max_tokens}"
        )
    if stride is not None and stride < 1:
        raise PolygptError(f"--stride must be >= 1, got {stride}")
    if batch_size is not None and batch_size < 1:
        raise PolygptError(f"--batch-size must be >= 1, got {batch_size}")
    lm = inference.load(path, backend=backend, device=device, precision=precision)
    ckpt = lm.checkpoint
    if data_dir is None:
        data_dir = ckpt.config.get("run", {}).get("data", {}).get("dir")
        if not data_dir:
            raise PolygptError(f"{path} does not record its data directory: pass --data DIR")
    tokens = data.load_split(data_dir, split)
    if data.load_tokenizer(data_dir).to_dict() != ckpt.tokenizer:
        raise PolygptError(f"the data in {data_dir} has another vocabulary than {path}")
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    res = perplexity(
        lm.backend,
        lm.model,
        tokens,
        lm.spec.block_size,
        method=method,
        stride=stride,
        batch_size=batch_size,
        vocab_size=lm.spec.vocab_size,
        char_level=ckpt.tokenizer.get("type") == "char",
        on_progress=on_progress,
    )
    res.split, res.precision, res.checkpoint, res.step = split, lm.precision, str(path), ckpt.step
    return res


def save_result(path: str | Path, res: EvalResult) -> None:
    """Record `res` in the checkpoint's config.json as metrics["eval_<split>"], atomically
    (a temporary sibling renamed over it). Training rewrites config.json without it, so a
    recorded evaluation never outlives the weights it measured."""
    p = Path(path) / checkpoints.CONFIG_FILE
    cfg = jsonfile.read_json(p)
    rec = {k: v for k, v in res.to_dict().items() if k not in ("checkpoint",)}
    rec["evaluated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cfg.setdefault("metrics", {})[f"eval_{res.split}"] = rec
    jsonfile.write_json(p, cfg)
