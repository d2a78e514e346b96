"""The generation engine: requests in, events out, one decode call per step over a slot cache.

`polygpt sample` (generate.stream_generate), `polygpt serve` and `polygpt bench` run on this,
the way llama.cpp's server slots and vLLM's persistent batch work:

- Rows. The engine's slot cache (backends/slots.py) has `max_rows` rows; the active requests
  occupy rows 0..n-1, so a decode step reads views of the cache. A request whose row ends
  (finished, stopped, cancelled) leaves at once: the last active row is copied into its hole.
- A step, in two parts. Admitting: waiting requests take free rows, their whole prompts are
  prefilled together in one call (identical prompts once, then copied: `n` choices of one
  prompt share one prefill) and their first tokens are sampled from the prefill's logits.
  Those events are handed out at once (`steps` yields each part's), so a first token waits
  for no decode of the other rows. Decoding: one `decode_rows` call feeds every row that was
  running before the step its last sampled token and returns the next-token logits, which are
  sampled with each row's own settings in one vectorized pass (sampling.sample_rows). The
  rows just admitted join at the next step; the running rows decode at every step, however
  many requests arrive.
- Context window. Positions are learned embeddings up to block_size, so a row whose block is
  full slides: its window restarts from its last `keep` tokens (the pending one included),
  re-prefilled in that row alone, and decoding goes on. Every token sees at least `keep`
  tokens of context; the default keep is half the block (llama.cpp's context shift: a keep of
  k re-prefills k tokens every block - k generated ones, so a larger keep costs more forward
  passes per token); keep = block_size gives nanoGPT's full context at one re-prefill per
  token. The rule depends only on the row's own length.
- Randomness. Row r draws from its own stream, seeded (seed, seed_stream) (sampling.RowStreams),
  one uniform per token, so a request's text does not depend on what else is in the batch,
  up to float rounding of batched matmuls.

Consuming it: `Engine.steps()` is the one way, an iterator of each step's typed events
(`TextChunk` for text that became final, `PromptScored`, `Finished(reason, tokens, text,
usage)` with reason "stop", "length" or "cancelled", `Failed(message)`); `generate` flattens
it, and in `polygpt serve` the engine process (engine_process.py) sends each step's list to
the HTTP side as one message. No HTTP here. A request is checked once, by `check_request`
(sampler settings by sampling.check_settings), where it enters an engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polygpt.errors import PolygptError
from polygpt.sampling import BadSetting, RowStreams, check_settings, make_sampler, sample_rows
from polygpt.textstream import TextStream, cut_at_stop

log = logging.getLogger("polygpt.engine")


class InvalidRequest(PolygptError):
    """A request no engine runs; `param` names the field at fault (a server's 400 names it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(eq=False)
class Request:
    """One completion: a prompt (token ids) and how to continue it."""

    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    seed_stream: int = 0  # which random stream of `seed` this request draws from
    stop: list[str] = field(default_factory=list)  # end before the first of these
    stream_text: bool = False  # emit TextChunk events as text becomes final
    logprobs: int | None = None  # per new token: its log-probability and the top N's
    prompt_logprobs: bool = False  # score the prompt's tokens too (echo)
    tag: int = 0  # the caller's id for it: a prompt's index (generate), a request id (serve)
    cancelled: bool = False  # set by Engine.cancel (any thread); the row leaves at the next step
    t_submit: float = 0.0
    t_admit: float | None = None  # when its prefill began (it had waited for a row and a step)
    t_first: float | None = None  # when its first token was sampled


def check_prompt(prompt: list[int], block_size: int) -> None:
    if len(prompt) == 0:
        raise InvalidRequest(
            "prompt", "the prompt is empty: give at least one token (e.g. a newline)"
        )
    if len(prompt) > block_size:
        raise InvalidRequest(
            "prompt",
            f"the prompt is {len(prompt)} tokens, longer than the model's context "
            f"(block_size {block_size})",
        )


def check_prompts(prompts: list[list[int]], block_size: int) -> None:
    if not prompts:
        raise InvalidRequest("prompt", "no prompts given")
    for p in prompts:
        check_prompt(p, block_size)


def check_request(req: Request, block_size: int) -> None:
    """InvalidRequest for a request no engine runs: the one place a request is checked."""
    check_prompt(req.prompt, block_size)
    try:
        check_settings(req.temperature, req.top_k, req.top_p)
    except BadSetting as e:
        raise InvalidRequest(e.name, str(e)) from None
    if req.max_tokens < 0:
        raise InvalidRequest("max_tokens", "max_tokens must be >= 0")
    if req.logprobs is not None and req.logprobs < 0:
        raise InvalidRequest("logprobs", "logprobs must be >= 0")


# A token's log-probability under the model (raw logits, before temperature and filters) and
# the N most likely tokens' (id, log-probability), most likely first.
TokenLogprob = tuple[float, list[tuple[int, float]]]


@dataclass
class TextChunk:
    """Text of a streaming request that became final."""

    request: Request
    text: str
    # with Request.logprobs: the new tokens whose text is now entirely out, and their
    # log-probabilities (a token whose text is partly held back comes with the rest of it)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class PromptScored:
    """A streaming request's prompt log-probabilities (tokens 1..), before any of its text."""

    request: Request
    logprobs: list[TokenLogprob]


@dataclass
class Finished:
    request: Request
    reason: str  # "stop", "length" or "cancelled"
    tokens: list[int]  # the new tokens entirely before a stop string
    text: str | None  # the new text, cut before a stop string (None without a tokenizer)
    logprobs: list[TokenLogprob] | None = None  # one per token (Request.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (the first has none)

    @property
    def usage(self) -> dict[str, int]:
        p, c = len(self.request.prompt), len(self.tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@dataclass
class Failed:
    request: Request
    message: str


Event = TextChunk | PromptScored | Finished | Failed


class QueueFull(PolygptError):
    """The waiting queue is at its bound (a server answers 429)."""


class _Row:
    """An admitted request: its tokens, window, random stream and text."""

    def __init__(self, req: Request, decode: Callable | None, keep: int):
        self.req = req
        self.history = list(req.prompt)  # prompt + new tokens; the last one is pending
        self.start = 0  # the window (what the next logits are conditioned on): history[start:]
        self.new = 0  # tokens generated
        self.rng = RowStreams(req.seed, [req.seed_stream]) if req.temperature > 0 else None
        self.keep = keep
        self.decode = decode
        self.text = None
        self._final: list[str] = []  # text the last token made final, not yet in a chunk
        if decode is not None and (req.stop or req.stream_text):
            emit = self._final.append if req.stream_text else None
            self.text = TextStream(decode, req.stop, emit)
        self.sent = 0  # characters streamed
        self.flushed = 0  # new tokens handed out in chunks (with logprobs)
        self.reason: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if req.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob] | None = None

    def window(self) -> np.ndarray:
        return np.asarray(self.history[self.start :], dtype=np.int64)

    def take(self, token: int) -> TextChunk | None:
        """Append a sampled token; sets `reason` when the row ends. The text it made final."""
        self.history.append(token)
        self.new += 1
        if self.text is not None and self.text.push(token):
            self.reason = "stop"
        elif self.new >= self.req.max_tokens:
            self.reason = "length"
        if not self._final:
            return None
        return self.chunk("".join(self._final), self._covered())

    def chunk(self, text: str, upto: int) -> TextChunk:
        """A chunk of `text`, with the new tokens up to `upto` not yet handed out."""
        self._final.clear()
        self.sent += len(text)
        if self.logprobs is None:
            return TextChunk(self.req, text)
        p = len(self.req.prompt)
        ids = self.history[p + self.flushed : p + upto]
        lps = self.logprobs[self.flushed : upto]
        self.flushed = max(self.flushed, upto)
        return TextChunk(self.req, text, ids, lps)

    def _covered(self) -> int:
        """How many new tokens have all their text out. Held-back text (a possible stop
        string's start) belongs to the last tokens: they wait, so that a stop string found
        inside one of them never leaves a token out that the whole completion lacks."""
        ts = self.text
        if self.logprobs is None or ts is None:
            return self.new
        if ts.kept is not None:  # a stop string: the tokens entirely before it
            return ts.kept
        if ts.anchor == len(ts.ids):  # nothing held back
            return self.new
        n = len(ts.ids) - 1  # the held text is the end of the last token's
        while n > ts.anchor and len(self.decode(ts.ids[ts.anchor : n])) > ts.skip:
            n -= 1
        return n

    def tokens(self) -> list[int]:
        ids = self.history[len(self.req.prompt) :]
        if self.text is not None and self.text.kept is not None:
            ids = ids[: self.text.kept]
        return ids


def top_logprobs(logits: np.ndarray, chosen: np.ndarray, n: int) -> list[TokenLogprob]:
    """Log-softmax of each row (float64): the chosen token's value and the top n."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    out = []
    for row, tok in zip(x, chosen):
        top = []
        if n > 0:
            idx = np.argpartition(-row, min(n, len(row) - 1))[:n]
            idx = idx[np.argsort(-row[idx], kind="stable")]
            top = [(int(i), float(row[i])) for i in idx]
        out.append((float(row[tok]), top))
    return out


class Engine:
    """Generation for many requests at once on one model.

    `submit` and `cancel` may be called from any thread; `step` from the one thread that owns
    the model. `decode_text` (ids -> str) is needed for stop strings and text."""

    def __init__(
        self,
        backend,
        model,
        block_size: int,
        max_rows: int = 16,
        keep: int = 0,
        decode_text: Callable[[list[int]], str] | None = None,
        max_queue: int | None = None,
        observe: Callable[[list[_Row], np.ndarray], None] | None = None,
    ):
        keep = keep or max(1, block_size // 2)
        if not 1 <= keep <= block_size:
            raise PolygptError(f"keep must be in 1..block_size ({block_size}), got {keep}")
        if max_rows < 1:
            raise PolygptError("the engine needs at least one row (--max-batch >= 1)")
        self.backend, self.model, self.block, self.keep = backend, model, block_size, keep
        self.max_rows, self.decode_text, self.max_queue = max_rows, decode_text, max_queue
        # (rows, logits) before each sampling, from a prefill or a decode: tests, parity checks
        self.observe = observe
        self.cache = backend.slot_cache(model, max_rows)
        self.active: list[_Row] = []  # row i of the cache is active[i]
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self.counts: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()  # time per phase
        self.batch_sizes: Counter[int] = Counter()  # decode steps by rows decoded
        self._samplers: dict[tuple, Callable] = {}  # by (temperature, top_k, top_p)
        self._running = 0  # rows running when the step in progress began (they decode)

    # -- any thread -------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request (PolygptError for a bad one, QueueFull past max_queue)."""
        self.submit_many([req])

    def submit_many(self, reqs: list[Request]) -> None:
        """Queue requests together: all of them, or none when the queue has no room."""
        for req in reqs:
            self._check(req)
        now = time.perf_counter()
        with self._cv:
            room = None if self.max_queue is None else self.max_queue - len(self._waiting)
            if room is not None and len(reqs) > room:
                raise QueueFull(f"the queue is full ({len(self._waiting)} requests waiting)")
            for req in reqs:
                req.t_submit = now
                self._waiting.append(req)
            self.counts["requests"] += len(reqs)
            self._cv.notify()

    def _check(self, req: Request) -> None:
        check_request(req, self.block)
        if (req.stop or req.stream_text) and self.decode_text is None:
            raise ValueError("stop strings and streaming need decode_text")

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def idle(self) -> bool:
        return not self.active and not self._waiting

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {
                "max_batch": self.max_rows,
                "running": len(self.active),
                "waiting": len(self._waiting),
                "decode_steps": sum(self.batch_sizes.values()),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                **dict(self.counts),
            }

    # -- the model thread -------------------------------------------------------------------
    def fail_all(self, message: str) -> list[Event]:
        rows, self.active = self.active, []
        self._running = 0
        return [Failed(r.req, message) for r in rows]

    def steps(
        self, feed: Callable[[], bool] | None = None, survive: bool = False
    ) -> Iterator[list[Event]]:
        """The one way to consume the engine: each step's events, one list per part of a step
        (admitting, then decoding: a new row's first token goes out before the decode).

        `feed()` runs before every step (it may submit and cancel) and says whether to go on;
        without it, steps run until every request has finished. `survive`: a step that raises
        fails the running requests (Failed events) and the engine goes on, as a server must."""
        while feed() if feed is not None else not self.idle():
            for part in (self._admitting, self._decoding):
                try:
                    events = part()
                except Exception:
                    if not survive:
                        raise
                    log.exception("generation failed; failing the running requests")
                    yield self.fail_all("the model failed while generating (see the log)")
                    break
                yield events

    def step(self) -> list[Event]:
        """One step's events, its two parts together."""
        return self._admitting() + self._decoding()

    def _admitting(self) -> list[Event]:
        """A step's first part: cancelled rows leave, waiting requests take free rows and their
        whole prompts are prefilled, with the slid windows, in one call; the new rows' first
        tokens are sampled from the prefill's logits (they wait for no decode)."""
        events: list[Event] = []
        self._leave([r for r in self.active if r.req.cancelled], "cancelled", events)
        t0 = time.perf_counter()
        self._running = len(self.active)  # the rows the second part decodes
        slides = [r for r in self.active if len(r.history) - r.start > self.block]
        for r in slides:  # the pending token would fall outside the block
            r.start = len(r.history) - self.keep
        fresh = self._admit(events)
        logits = self._prefill(fresh, slides) if fresh or slides else None
        t1 = time.perf_counter()
        self.seconds["prefill"] += t1 - t0
        for r in fresh:
            r.req.t_admit = t0
        if fresh:  # (a new row that ends at once leaves; the running rows 0..n-1 stay put)
            self._advance(fresh, logits, t1, events)
        return events

    def _decoding(self) -> list[Event]:
        """A step's second part: one decode call for the rows that were running before it
        (the rows just admitted have their token from the prefill, and join at the next
        step), then their tokens sampled."""
        events: list[Event] = []
        n = self._running
        if n == 0:
            return events
        t1 = time.perf_counter()
        rows = self.active[:n]
        pending = np.array([r.history[-1] for r in rows], dtype=np.int64)
        logits = self.backend.decode_rows(self.cache, range(n), pending)
        t2 = time.perf_counter()
        self.seconds["decode"] += t2 - t1
        self.batch_sizes[n] += 1
        self._advance(rows, logits, t2, events)
        return events

    def _advance(self, rows: list[_Row], logits: np.ndarray, now: float, events: list) -> None:
        """Each row's next token sampled from its logits; its text, and the rows that end."""
        if self.observe is not None:
            self.observe(rows, logits)
        t = time.perf_counter()
        nxt = self._sample(rows, logits)
        for i, r in enumerate(rows):
            if r.logprobs is not None:
                r.logprobs.extend(top_logprobs(logits[i : i + 1], nxt[i : i + 1], r.req.logprobs))
        ended = []
        for r, tok in zip(rows, nxt.tolist()):
            if r.req.t_first is None:
                r.req.t_first = now
            chunk = r.take(tok)
            if chunk is not None:
                events.append(chunk)
            if r.reason is not None:
                ended.append(r)
        self.seconds["sample"] += time.perf_counter() - t
        self._leave(ended, None, events)

    def _sample(self, rows: list[_Row], logits: np.ndarray) -> np.ndarray:
        req = [r.req for r in rows]
        u = np.zeros(len(rows))
        for i, r in enumerate(rows):
            if r.rng is not None:
                u[i] = r.rng.next()[0]
        first = req[0]
        key = (first.temperature, first.top_k, first.top_p)
        if all((q.temperature, q.top_k, q.top_p) == key for q in req):  # the usual case
            sampler = self._samplers.get(key) or self._samplers.setdefault(key, make_sampler(*key))
            return sampler(logits, u)
        temperature = np.array([q.temperature for q in req], dtype=np.float64)
        top_k = np.array([q.top_k for q in req], dtype=np.int64)
        top_p = np.array([q.top_p for q in req], dtype=np.float64)
        return sample_rows(logits, temperature, top_k, top_p, u)

    def _admit(self, events: list[Event]) -> list[_Row]:
        new = []
        with self._cv:
            while self._waiting and len(self.active) < self.max_rows:
                req = self._waiting.popleft()
                if req.cancelled or req.max_tokens == 0:
                    reason = "cancelled" if req.cancelled else "length"
                    text = "" if self.decode_text is not None else None
                    lps = [] if req.logprobs is not None else None
                    scored = self._score(req) if req.prompt_logprobs and not req.cancelled else None
                    if scored is not None and req.stream_text:
                        events.append(PromptScored(req, scored))
                    events.append(Finished(req, reason, [], text, lps, scored))
                    continue
                row = _Row(req, self.decode_text, self.keep)
                if req.prompt_logprobs:
                    row.prompt_logprobs = self._score(req)
                    if req.stream_text:
                        events.append(PromptScored(req, row.prompt_logprobs))
                self.active.append(row)
                new.append(row)
        return new

    def _score(self, req: Request) -> list[TokenLogprob]:
        """The prompt's tokens 1.. under the model: log-probabilities from the backend's
        `target_logprobs` (what `polygpt eval` sums), the top N from its logits."""
        p = np.asarray(req.prompt, dtype=np.int64)
        if len(p) < 2:
            return []
        x, y = p[None, :-1], p[None, 1:]
        lp = self.backend.target_logprobs(self.model, x, y)[0]
        n = req.logprobs or 0
        tops = [[] for _ in lp]
        if n > 0:
            tops = [t for _, t in top_logprobs(self.backend.logits(self.model, x)[0], y[0], n)]
        self.counts["scored_tokens"] += len(lp)
        return [(float(v), t) for v, t in zip(lp, tops)]

    def _prefill(self, fresh: list[_Row], slides: list[_Row]) -> np.ndarray:
        """One prefill call for new prompts (whole, identical ones once) and slid windows (but
        their pending token; one whose window is that token alone has nothing to prefill).
        Returns the logits after each new prompt, in the order of `fresh`."""
        index = {id(r): i for i, r in enumerate(self.active)}
        rows, tokens, copies, empty = [], [], [], []
        first: dict[tuple[int, ...], int] = {}  # a prompt -> its row in the prefill call
        source = []  # each new row's row in the prefill call
        for r in fresh:
            prompt = tuple(r.history)
            if prompt in first:
                copies.append((rows[first[prompt]], index[id(r)]))
            else:
                first[prompt] = len(rows)
                rows.append(index[id(r)])
                tokens.append(prompt)
            source.append(first[prompt])
        for r in slides:
            window = r.history[r.start : -1]
            if not window:
                empty.append(index[id(r)])
            else:
                rows.append(index[id(r)])
                tokens.append(window)
        logits = None
        if rows:
            logits = self.backend.prefill_rows(self.cache, rows, tokens)
            self.counts["prefill_calls"] += 1
            self.counts["prefill_tokens"] += sum(map(len, tokens))
        if copies:
            src, dst = zip(*copies)
            self.backend.copy_rows(self.cache, list(src), list(dst))
        if empty:
            self.cache.reset(empty)
        self.counts["slides"] += len(slides)
        return logits[source] if fresh else None

    def _leave(self, ended: list[_Row], reason: str | None, events: list[Event]) -> None:
        """Finish rows and compact: the last active rows move into the holes."""
        if not ended:
            return
        gone = {id(r) for r in ended}
        for r in ended:
            events.extend(self._finish(r, reason or r.reason))
        keep_n = len(self.active) - len(ended)
        holes = [i for i, r in enumerate(self.active[:keep_n]) if id(r) in gone]
        movers = [i for i in range(keep_n, len(self.active)) if id(self.active[i]) not in gone]
        if holes:
            self.backend.copy_rows(self.cache, movers, holes)
            for h, m in zip(holes, movers):
                self.active[h] = self.active[m]
        del self.active[keep_n:]

    def _finish(self, r: _Row, reason: str) -> list[Event]:
        """The row's last chunk (what was held back) and its Finished. Its text is cut at a
        stop string here, the one place: a token that straddles the stop string gives its text
        before it, though the token itself is left out of `tokens`."""
        ids = r.tokens()
        events: list[Event] = []
        text = None
        if self.decode_text is not None:
            text = cut_at_stop(self.decode_text(r.history[len(r.req.prompt) :]), r.req.stop)
            rest = text[r.sent :]  # held back for a stop string that never came
            unsent = r.logprobs is not None and r.flushed < len(ids)
            if r.req.stream_text and reason != "cancelled" and (rest or unsent):
                events.append(r.chunk(rest, len(ids)))
        self.counts["completion_tokens"] += len(ids)
        lps = None if r.logprobs is None else r.logprobs[: len(ids)]
        events.append(Finished(r.req, reason, ids, text, lps, r.prompt_logprobs))
        return events
