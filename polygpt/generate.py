"""`generate`: a batch of prompts to completion, on the engine (polygpt/engine.py).

The engine does batching, the KV cache, sampling, stop strings, streaming and the context
window; this module is its simplest consumer, as mlx-lm's `generate` consumes
`stream_generate`: `stream_generate` submits every prompt as a request and returns the engine's
events as one iterator, `generate` drains it into each prompt's `Finished` result (its tokens
and its text, cut at a stop string once, by the engine).

`uncached_generate` is nanoGPT's method, kept as the speed baseline: crop the sequence to the
last block_size tokens and run a full forward pass for every new token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from polygpt.config import SampleConfig
from polygpt.engine import Engine, Event, Finished, Request, check_prompts
from polygpt.errors import PolygptError
from polygpt.sampling import RowStreams, make_sampler

__all__ = [
    "GenerationConfig",
    "check_prompts",
    "finish",
    "generate",
    "stream_generate",
    "uncached_generate",
]


@dataclass
class GenerationConfig:
    # the defaults are the [sample] section's (config.SampleConfig): one place
    max_new_tokens: int = SampleConfig.max_new_tokens
    temperature: float = SampleConfig.temperature  # 0: greedy
    top_k: int = SampleConfig.top_k  # 0: off
    top_p: float = SampleConfig.top_p  # 1: off
    seed: int = SampleConfig.seed  # prompt b draws from a generator seeded (seed, b)
    stop: list[str] = field(default_factory=list)  # end a row before the first of these
    keep: int = 0  # tokens kept when a row's window slides; 0: block_size // 2


def stream_generate(
    backend,
    model,
    block_size: int,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    decode_text: Callable[[list[int]], str] | None = None,
    stream_text: bool = False,
    seed_streams: list[int] | None = None,
    observe: Callable | None = None,
) -> Iterator[Event]:
    """Submit every prompt (Request.tag: its index) and return the engine's events. Requests
    are checked here, before the first event (a PolygptError names the problem).

    `stream_text`: TextChunk events as each row's text becomes final; stop strings and text
    need `decode_text` (ids -> str). `seed_streams[b]`: which random stream (seeded (cfg.seed,
    seed_streams[b])) prompt b samples from; default 0..B-1, so generating prompt b alone with
    seed_streams=[b] gives the batch's row b. `observe(rows, logits)`: called with the
    logits each token is sampled from, a prefill's or a decode's (Engine's `observe`)."""
    if seed_streams is not None and len(seed_streams) != len(prompts):
        raise ValueError("seed_streams needs one entry per prompt")
    engine = Engine(
        backend, model, block_size, max(1, len(prompts)), cfg.keep, decode_text, observe=observe
    )
    engine.submit_many(
        [
            Request(
                prompt=list(p),
                max_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                seed=cfg.seed,
                seed_stream=b if seed_streams is None else seed_streams[b],
                stop=list(cfg.stop),
                stream_text=stream_text,
                tag=b,
            )
            for b, p in enumerate(prompts)
        ]
    )
    return (ev for events in engine.steps() for ev in events)


def finish(events: Iterator[Event], on_event: Callable[[Event], None] | None = None):
    """Drain `events` (each one to `on_event` first); each request's Finished, by tag."""
    out: dict[int, Finished] = {}
    for ev in events:
        if on_event is not None:
            on_event(ev)
        if isinstance(ev, Finished):
            out[ev.request.tag] = ev
    return [out[b] for b in range(len(out))]


def generate(
    backend,
    model,
    block_size: int,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    seed_streams: list[int] | None = None,
    observe: Callable | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt (stream_generate's Finished tokens)."""
    events = stream_generate(
        backend, model, block_size, prompts, cfg, seed_streams=seed_streams, observe=observe
    )
    return [f.tokens for f in finish(events)]


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
