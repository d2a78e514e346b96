"""Text generation with a KV cache: prefill once, then one decode step per token.

Backend-neutral: a backend supplies `prefill` and `decode` (logits for the last position), this
module does batching (left padding), sampling, stop strings, streaming and the context window.

Context window: positions are learned embeddings up to block_size, so when a row's cache is full
the window slides by re-prefilling the last `keep` tokens (3/4 of the block by default) and
decoding on from there; every token still sees at least `keep` tokens of context, and the cost
of the re-prefill is spread over block_size - keep tokens. `uncached_generate` is nanoGPT's
method (a full forward over the last block_size tokens per new token), kept as the baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from polygpt.errors import PolygptError
from polygpt.sampling import make_sampler


@dataclass
class GenerationConfig:
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1337
    stop: list[str] = field(default_factory=list)
    keep: int = 0  # tokens kept when the window slides; 0: 3/4 of block_size


def _left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    T = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), T), dtype=np.int64)
    pad = np.zeros(len(prompts), dtype=np.int64)
    for b, p in enumerate(prompts):
        pad[b] = T - len(p)
        tokens[b, pad[b] :] = p
    return tokens, pad


def check_prompts(prompts: list[list[int]], block_size: int) -> None:
    if not prompts:
        raise PolygptError("no prompts given")
    for p in prompts:
        if len(p) == 0:
            raise PolygptError("the prompt is empty: give at least one token (e.g. a newline)")
        if len(p) > block_size:
            raise PolygptError(
                f"the prompt is {len(p)} tokens, longer than the model's context "
                f"(block_size {block_size})"
            )


def generate(
    backend,
    model,
    block_size: int,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    decode_text: Callable[[list[int]], str] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Generate up to cfg.max_new_tokens for each prompt; returns the new tokens per row.

    `on_token(row, token)` streams tokens as they are chosen; stop strings need `decode_text`.
    A row that hits a stop string is cut before it and stops streaming.
    """
    check_prompts(prompts, block_size)
    sampler = make_sampler(cfg.temperature, cfg.top_k, cfg.top_p)
    rng = np.random.default_rng(cfg.seed)
    keep = cfg.keep or max(1, block_size * 3 // 4)
    B = len(prompts)
    history = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    tokens, pad = _left_pad(prompts)
    cache, logits = backend.prefill(model, tokens, pad)
    length = tokens.shape[1]  # filled cache positions, pads included
    for _ in range(cfg.max_new_tokens):
        nxt = sampler(logits, rng)
        for b in range(B):
            if done[b]:
                continue
            t = int(nxt[b])
            history[b].append(t)
            out[b].append(t)
            if cfg.stop and decode_text is not None:
                text = decode_text(out[b])
                hit = [text.index(s) for s in cfg.stop if s in text]
                if hit:
                    done[b] = True
                    continue
            if on_token is not None:
                on_token(b, t)
        if done.all():
            break
        if length == block_size:  # window full: slide by re-prefilling the last `keep` tokens
            tokens, pad = _left_pad([h[-keep:] for h in history])
            cache, logits = backend.prefill(model, tokens, pad)
            length = tokens.shape[1]
        else:
            logits = backend.decode(model, cache, nxt)
            length += 1
    if cfg.stop and decode_text is not None:
        out = [_cut_at_stop(o, decode_text, cfg.stop) for o in out]
    return out


def _cut_at_stop(ids: list[int], decode_text, stops: list[str]) -> list[int]:
    text = decode_text(ids)
    cut = min((text.index(s) for s in stops if s in text), default=None)
    if cut is None:
        return ids
    # drop tokens from the end until the text no longer reaches the stop string
    while ids and len(decode_text(ids)) > cut:
        ids = ids[:-1]
    return ids


def uncached_generate(backend, model, block_size: int, prompt: list[int], cfg: GenerationConfig):
    """nanoGPT's `generate`: recompute the whole (cropped) context for every token."""
    check_prompts([prompt], block_size)
    sampler = make_sampler(cfg.temperature, cfg.top_k, cfg.top_p)
    rng = np.random.default_rng(cfg.seed)
    ids = list(prompt)
    for _ in range(cfg.max_new_tokens):
        ctx = np.array([ids[-block_size:]], dtype=np.int64)
        logits = backend.logits(model, ctx)[:, -1]
        ids.append(int(sampler(logits, rng)[0]))
    return ids[len(prompt) :]
