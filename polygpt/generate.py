"""`generate`: a batch of prompts to completion, on the engine (polygpt/engine.py).

The engine does batching, the KV cache, sampling, stop strings, streaming and the context
window; this module is its simplest consumer (as mlx-lm's `generate` consumes
`stream_generate`): every prompt is a request, all run as one batch, and the new token ids come
back per prompt.

`uncached_generate` is nanoGPT's method, kept as the speed baseline: crop the sequence to the
last block_size tokens and run a full forward pass for every new token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from polygpt.engine import Engine, Finished, Request, TextChunk, check_prompts
from polygpt.errors import PolygptError
from polygpt.sampling import RowStreams, make_sampler

__all__ = ["GenerationConfig", "check_prompts", "generate", "uncached_generate"]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 500
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 1337  # row b draws from a generator seeded (seed, b)
    stop: list[str] = field(default_factory=list)  # end a row before the first of these
    keep: int = 0  # tokens kept when a row's window slides; 0: block_size // 2


def generate(
    backend,
    model,
    block_size: int,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    decode_text: Callable[[list[int]], str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    streams: list[int] | None = None,
    observe: Callable | None = None,
) -> list[list[int]]:
    """Generate up to cfg.max_new_tokens for each prompt; returns the new token ids per row.

    `on_text(row, text)` streams each row's text as it becomes final; stop strings and streaming
    need `decode_text` (ids -> str). A row that hits a stop string ends before it.
    `streams[b]`: which random stream (seeded (cfg.seed, streams[b])) row b samples from;
    default 0..B-1. Generating prompt b alone with streams=[b] gives the batch's row b.
    `observe(rows, logits)`: called after every decode step (Engine's `observe`).
    """
    check_prompts(prompts, block_size)
    if (cfg.stop or on_text is not None) and decode_text is None:
        raise ValueError("stop strings and streaming need decode_text")
    if streams is not None and len(streams) != len(prompts):
        raise ValueError("streams needs one entry per prompt")
    make_sampler(cfg.temperature, cfg.top_k, cfg.top_p)  # ValueError for bad settings
    B = len(prompts)
    engine = Engine(backend, model, block_size, B, cfg.keep, decode_text, observe=observe)
    if cfg.max_new_tokens <= 0:
        return [[] for _ in range(B)]
    for b, p in enumerate(prompts):
        engine.submit(
            Request(
                prompt=list(p),
                max_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                seed=cfg.seed,
                stream=b if streams is None else streams[b],
                stop=list(cfg.stop),
                stream_text=on_text is not None,
                tag=b,
            )
        )
    out: dict[int, list[int]] = {}
    while len(out) < B:
        for ev in engine.step():
            if isinstance(ev, TextChunk):
                on_text(ev.request.tag, ev.text)
            elif isinstance(ev, Finished):
                out[ev.request.tag] = ev.tokens
    return [out[b] for b in range(B)]


def uncached_generate(
    backend, model, block_size: int, prompts: list[list[int]], cfg: GenerationConfig
) -> list[list[int]]:
    """nanoGPT's `generate`: recompute the whole (cropped) context for every token.

    Prompts must have equal lengths (nanoGPT's idx is one (B, T) tensor). Draws use the same
    per-row random streams as `generate`, so both pick the same tokens as long as no window
    has slid (after that nanoGPT crops every step while `generate` slides by `keep`)."""
    check_prompts(prompts, block_size)
    if len({len(p) for p in prompts}) != 1:
        raise PolygptError("uncached_generate needs prompts of equal length")
    sampler = make_sampler(cfg.temperature, cfg.top_k, cfg.top_p)
    streams = RowStreams(cfg.seed, len(prompts)) if cfg.temperature > 0 else None
    ids = np.array(prompts, dtype=np.int64)
    T0 = ids.shape[1]
    for _ in range(cfg.max_new_tokens):
        logits = backend.logits(model, ids[:, -block_size:])[:, -1]
        nxt = sampler(logits, None if streams is None else streams.next())
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return ids[:, T0:].tolist()
