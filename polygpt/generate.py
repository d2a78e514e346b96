"""Text generation with a KV cache: prefill once, then one decode step per token.

Backend-neutral: a backend supplies `prefill` (left-padded prompts -> cache + last logits) and
`decode` (one token per row -> next logits); this module does batching, sampling
(polygpt.sampling), stop strings, streaming and the context window.

Context window. Positions are learned embeddings up to block_size, so a row whose cache holds
block_size tokens slides: its window restarts from its last `keep` tokens, re-prefilled in one
forward pass, and decoding goes on from there. Every token sees at least `keep` tokens of
context; the re-prefill (keep tokens of forward pass) is paid once per block_size - keep new
tokens. The default keep is half the block, llama.cpp's "context shift" rule: 3/4 of the block
costs 3 tokens of forward pass per generated token instead of 1, which at batch 64 on a CPU
made the re-prefills 4x the cost of the decode steps themselves; keep = block_size - 1 gives
nanoGPT's full context at one re-prefill per token. The rule is per row (it depends only on
the row's own length), so a row generates the same tokens alone or in any batch: rows of
different lengths slide at different steps, and a step where any row slides re-prefills the
batch with every row's current window (rows that do not slide get their unchanged window back;
finished rows leave the batch there).

`uncached_generate` is nanoGPT's method, kept as the speed baseline: crop the sequence to the
last block_size tokens and run a full forward pass for every new token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from polygpt.errors import PolygptError
from polygpt.sampling import RowStreams, make_sampler


@dataclass
class GenerationConfig:
    max_new_tokens: int = 500
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 1337  # row b draws from a generator seeded (seed, b)
    stop: list[str] = field(default_factory=list)  # end a row before the first of these
    keep: int = 0  # tokens kept when a row's window slides; 0: block_size // 2


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


class ContextWindows:
    """The KV-cached context windows of a batch of rows, advanced one token per step.

    Tokens live in one buffer with the prompts right-aligned at column t0 (left padding): row b's
    window (what the cache holds for it) is `buf[b, start[b]:end]` and its new tokens
    `buf[b, t0:end]`; all rows share `end`. The cache holds the batch rows listed in `rows`
    (finished rows drop out at the next re-prefill) and `logits[i]` are the next-token logits
    of batch row `rows[i]`.
    """

    def __init__(
        self,
        backend,
        model,
        block_size: int,
        prompts: list[list[int]],
        keep: int = 0,
        max_new_tokens: int = 0,
        caches: dict | None = None,
    ):
        """`caches`: spare caches of this model by batch size, shared with other
        ContextWindows (a server's many batches): a prefill takes one of its batch size from
        there, and a cache left behind when the batch size changes goes back. Saves
        allocating caches (and MLX's trace of the decode step over each)."""
        check_prompts(prompts, block_size)
        keep = keep or max(1, block_size // 2)
        if not 1 <= keep <= block_size:
            raise PolygptError(f"keep must be in 1..block_size ({block_size}), got {keep}")
        self.backend, self.model, self.block_size, self.keep = backend, model, block_size, keep
        B, T0 = len(prompts), max(len(p) for p in prompts)
        self.buf = np.zeros((B, T0 + max(max_new_tokens, 1)), dtype=np.int64)
        self.start = np.array([T0 - len(p) for p in prompts], dtype=np.int64)
        for b, p in enumerate(prompts):
            self.buf[b, self.start[b] : T0] = p
        self.end = self.t0 = T0  # every row's first new token goes to column T0
        self.rows = np.arange(B)
        self.finished = np.zeros(B, dtype=bool)
        self.caches = caches
        self.cache, self.cache_rows = None, 0
        self._prefill()

    def window(self, b: int) -> np.ndarray:
        """The tokens batch row b's next logits are conditioned on."""
        return self.buf[b, self.start[b] : self.end]

    def generated(self, b: int) -> list[int]:
        """The tokens appended to batch row b so far."""
        return self.buf[b, self.t0 : self.end].tolist()

    def _prefill(self) -> None:
        rows = self.rows
        width = self.end - self.start[rows]  # window length per cache row
        T = int(width.max())
        tokens = self.buf[rows, self.end - T : self.end].copy()
        pad = T - width
        tokens[np.arange(T)[None, :] < pad[:, None]] = 0  # padding (masked out anyway)
        reuse = self.cache if len(rows) == self.cache_rows else None
        if reuse is None and self.caches is not None:
            if self.cache is not None:
                self.caches.setdefault(self.cache_rows, self.cache)
            reuse = self.caches.pop(len(rows), None)
        self.cache, self.logits = self.backend.prefill(self.model, tokens, pad, cache=reuse)
        self.cache_rows = len(rows)
        self._first_full = int(self.start[rows].min()) + self.block_size

    def step(self, tokens: np.ndarray) -> None:
        """Append one token to every cache row (tokens[i] to batch row rows[i])."""
        if self.end == self.buf.shape[1]:  # more steps than max_new_tokens: grow the buffer
            self.buf = np.concatenate([self.buf, np.zeros_like(self.buf)], axis=1)
        rows = self.rows
        self.buf[rows, self.end] = tokens
        self.end += 1
        if self.end > self._first_full:  # some row's window would exceed block_size: slide it
            full = self.end - self.start[rows] > self.block_size
            self.start[rows[full]] = self.end - self.keep
            self.rows = rows[~self.finished[rows]]
            if len(self.rows):
                self._prefill()
        else:
            self.logits = self.backend.decode(self.model, self.cache, tokens)


class TextStream:
    """Incremental text of one row: finds stop strings and streams only text that is final.

    Text that could still become the start of a stop string, and a trailing incomplete UTF-8
    character (byte-level BPE), is held back until the next tokens decide it.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stops: list[str],
        emit: Callable[[str], None] | None,
    ):
        self.decode, self.stops, self.emit = decode, [s for s in stops if s], emit
        self.ids: list[int] = []
        self.anchor = 0  # ids[anchor:] decode to text of which `skip` chars are already out
        self.skip = 0
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.kept: int | None = None  # number of ids kept once a stop string was hit

    def push(self, token: int) -> bool:
        """Add a token; True when the row hit a stop string (and is finished)."""
        self.ids.append(token)
        pending = self.decode(self.ids[self.anchor :])
        new = pending[self.skip :]
        hits = [i for i in (new.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._out(new[: min(hits)])
            self.kept = self._tokens_before_stop()
            return True
        safe = len(new) - self._held(new)
        if safe > 0:
            self._out(new[:safe])
            self.skip += safe
        if self.skip == len(pending):  # everything decoded so far is out: restart the window
            self.anchor, self.skip = len(self.ids), 0
        elif len(self.ids) - self.anchor > 2 * self.hold + 8:
            self._advance(pending)
        return False

    def _held(self, new: str) -> int:
        n = 0
        if new.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its bytes
            n = len(new) - len(new.rstrip("\ufffd"))
            new = new[:-n]
        for k in range(min(self.hold, len(new)), 0, -1):
            if any(s.startswith(new[-k:]) for s in self.stops):
                return n + k
        return n

    def _advance(self, pending: str) -> None:
        """Drop leading tokens that are fully streamed out of the decode window."""
        while self.anchor < len(self.ids) - 1:
            rest = self.decode(self.ids[self.anchor + 1 :])
            cut = len(pending) - len(rest)
            if cut > self.skip or pending[cut:] != rest:
                return
            self.anchor, self.skip, pending = self.anchor + 1, self.skip - cut, rest

    def _out(self, text: str) -> None:
        if text and self.emit is not None:
            self.emit(text)

    def _tokens_before_stop(self) -> int:
        """How many tokens precede the first stop string entirely (a BPE token may straddle)."""
        text = self.decode(self.ids)
        cut = min(text.find(s) for s in self.stops if s in text)
        n = len(self.ids)
        while n and len(self.decode(self.ids[:n])) > cut:
            n -= 1
        return n


def generate(
    backend,
    model,
    block_size: int,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    decode_text: Callable[[list[int]], str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    streams: list[int] | None = None,
) -> list[list[int]]:
    """Generate up to cfg.max_new_tokens for each prompt; returns the new token ids per row.

    `on_text(row, text)` streams each row's text as it becomes final; stop strings and streaming
    need `decode_text` (ids -> str). A row that hits a stop string ends before it.
    `streams[b]`: which random stream (seeded (cfg.seed, streams[b])) row b samples from;
    default 0..B-1. Generating prompt b alone with streams=[b] gives the batch's row b.
    """
    check_prompts(prompts, block_size)
    if (cfg.stop or on_text is not None) and decode_text is None:
        raise ValueError("stop strings and streaming need decode_text")
    B = len(prompts)
    if cfg.max_new_tokens <= 0:
        return [[] for _ in range(B)]
    sampler = make_sampler(cfg.temperature, cfg.top_k, cfg.top_p)
    if streams is not None and len(streams) != B:
        raise ValueError("streams needs one entry per prompt")
    rng = RowStreams(cfg.seed, streams or B) if cfg.temperature > 0 else None
    ctx = ContextWindows(backend, model, block_size, prompts, cfg.keep, cfg.max_new_tokens)
    texts = None
    if cfg.stop or on_text is not None:
        texts = [
            TextStream(
                decode_text, cfg.stop, None if on_text is None else (lambda s, b=b: on_text(b, s))
            )
            for b in range(B)
        ]
    for n in range(cfg.max_new_tokens):
        rows = ctx.rows
        u = None if rng is None else rng.next()
        nxt = sampler(ctx.logits, None if u is None else u[rows])
        if texts is not None:
            for i, b in enumerate(rows.tolist()):
                if not ctx.finished[b] and texts[b].push(int(nxt[i])):
                    ctx.finished[b] = True
            if ctx.finished.all():
                ctx.buf[rows, ctx.end] = nxt
                ctx.end += 1
                break
        if n == cfg.max_new_tokens - 1:  # the last token needs no forward pass
            ctx.buf[rows, ctx.end] = nxt
            ctx.end += 1
            break
        ctx.step(nxt)
    out = []
    for b in range(B):
        ids = ctx.generated(b)
        if texts is not None and texts[b].kept is not None:
            ids = ids[: texts[b].kept]
        out.append(ids)
    return out


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
