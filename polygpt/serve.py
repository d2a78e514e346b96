"""`polygpt serve`: a checkpoint behind an OpenAI-compatible HTTP API, with continuous batching.

Two threads. The model thread (the process's main thread: MLX does not exit cleanly once a
sub-thread has used it) owns the backend and runs `Engine.run`; uvicorn serves the FastAPI app
from a second thread and never touches the framework, so `/health` answers during generation.
The app validates and tokenizes a request, hands its rows to the engine and relays the engine's
events (text, finish) from an asyncio queue, as JSON or as server-sent events.

Continuous batching. A request's choices (prompts x n) become rows. Rows that arrive while the
engine is busy join at the next decode step as a new *group*: a ContextWindows (the engine of
polygpt.generate) prefilled with just their prompts, so joining costs only the new rows' own
prefill. Each step decodes every group (one backend decode call per group) and samples each row
with its own settings. With more than `max_groups` groups, all but the one holding the most
context are merged into one by re-prefilling their live rows' current windows (the re-prefill
a sliding window does; young groups hold short windows, so it is cheap), so a step is a few
batched calls. Finished and cancelled rows free their slot at once and leave the cache at the
next re-prefill or when their group ends. Joining without any re-prefill would need backend
ops that copy cache rows between caches, which the Backend protocol does not have (yet).

Same text as `polygpt sample`: choice k of a request (prompt k // n, sample k % n) samples from
the random stream (seed, k) and its window follows the per-row rule of generate.ContextWindows,
so its tokens do not depend on what else is in the batch (up to float rounding of batched
matmuls, as in the engine's own batched-equals-one-by-one tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from polygpt import inference
from polygpt.errors import PolygptError
from polygpt.generate import ContextWindows, TextStream
from polygpt.sampling import RowStreams, make_sampler

log = logging.getLogger("polygpt.serve")


# ---- the engine (model thread) ---------------------------------------------------------------


@dataclass
class Params:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)


class Job:
    """One HTTP request: its prompts (token ids), settings and an event sink.

    `emit(event)` is called from the model thread with ("text", k, text) as choice k's text
    becomes final and ("done", k, text, finish_reason, n_tokens) when it ends, or
    ("error", message) if the model failed."""

    def __init__(
        self, prompts: list[list[int]], n: int, params: Params, emit: Callable, rid: str = ""
    ):
        self.id = rid or f"cmpl-{uuid.uuid4().hex[:24]}"
        self.prompts, self.n, self.params, self.emit = prompts, n, params, emit
        self.cancelled = False
        self.t_arrival = time.perf_counter()
        self.t_first: float | None = None
        self.remaining = len(prompts) * n
        self.completion_tokens = 0


class _Row:
    """Choice k of a job: its tokens, sampler, random stream and text stream."""

    def __init__(self, job: Job, k: int, decode: Callable, sampler: Callable, stream: bool):
        self.job, self.k = job, k
        self.prompt = job.prompts[k // job.n]
        p = job.params
        self.sampler = sampler
        self.rng = RowStreams(p.seed, [k]) if p.temperature > 0 else None
        self.ids: list[int] = []
        self.decode = decode
        self.sent = 0  # characters streamed so far
        self.text = TextStream(decode, p.stop, self._out if stream else None)
        self.finish: str | None = None

    def _out(self, text: str) -> None:
        self.sent += len(text)
        self.job.emit(("text", self.k, text))

    def take(self, tok: int) -> None:
        """Append the sampled token; sets `finish` when the row ends."""
        self.ids.append(tok)
        if self.job.t_first is None:
            self.job.t_first = time.perf_counter()
        if self.text.push(tok):
            self.finish = "stop"
        elif len(self.ids) >= self.job.params.max_tokens:
            self.finish = "length"

    def result(self) -> tuple[str, int]:
        """The final text (as LanguageModel.generate cuts it) and its token count."""
        ids = self.ids if self.text.kept is None else self.ids[: self.text.kept]
        text = self.decode(ids)
        stops = [s for s in self.job.params.stop if s in text]
        if stops:
            text = text[: min(text.find(s) for s in stops)]
        return text, len(ids)


class _Group:
    """Rows decoded by one backend call per step: a ContextWindows and the rows it holds."""

    def __init__(self, lm, rows: list[_Row], windows: list[list[int]], keep: int, caches: dict):
        self.rows = rows
        budget = max(r.job.params.max_tokens - len(r.ids) for r in rows)
        block = lm.spec.block_size
        self.ctx = ContextWindows(lm.backend, lm.model, block, windows, keep, budget, caches)

    def live(self) -> list[int]:
        return [b for b in self.ctx.rows.tolist() if not self.ctx.finished[b]]

    def step(self) -> tuple[int, list[_Row]]:
        """Sample one token for every live row, then one forward pass for those going on.
        Returns (rows decoded, rows that ended)."""
        ctx, ended = self.ctx, []
        by_sampler: dict[Callable, list[int]] = {}  # rows with the same settings: one call
        for i, b in enumerate(ctx.rows.tolist()):
            if ctx.finished[b]:
                continue
            r = self.rows[b]
            if r.job.cancelled:
                r.finish = "cancelled"
                ctx.finished[b] = True
                ended.append(r)
            else:
                by_sampler.setdefault(r.sampler, []).append(i)
        nxt = np.zeros(len(ctx.rows), dtype=np.int64)  # finished rows still in the cache: any
        going = 0
        for sampler, idx in by_sampler.items():
            rows = [self.rows[b] for b in ctx.rows[idx].tolist()]
            u = None if rows[0].rng is None else np.concatenate([r.rng.next() for r in rows])
            nxt[idx] = sampler(ctx.logits[idx], u)
            for r, i in zip(rows, idx):
                r.take(int(nxt[i]))
                if r.finish:
                    ctx.finished[ctx.rows[i]] = True
                    ended.append(r)
                else:
                    going += 1
        if going:
            ctx.step(nxt)
        return going + len(ended), ended


def _mostly_done(g: _Group) -> bool:
    """More finished rows than live ones still ride in the group's decode calls."""
    dead = len(g.ctx.rows) - len(g.live())
    return dead >= max(4, len(g.live()) + 1)


class Engine:
    """The scheduler. `submit`/`cancel` are called from any thread; `run` (or `step`) from the
    one thread that owns the model."""

    def __init__(self, lm, max_batch: int = 16, max_groups: int = 4, keep: int = 0):
        if max_batch < 1 or max_groups < 1:
            raise PolygptError("--max-batch and max_groups must be >= 1")
        self.lm, self.max_batch, self.max_groups, self.keep = lm, max_batch, max_groups, keep
        self._cv = threading.Condition()
        self._waiting: deque[_Row] = deque()
        self._groups: list[_Group] = []
        self._samplers: dict[tuple, Callable] = {}
        self._caches: dict[int, Any] = {}  # spare caches by batch size, for reuse
        spec = lm.spec  # fp32 keys and values of a full window, per cache row
        row_bytes = spec.n_layer * 2 * spec.block_size * spec.n_embd * 4
        self._pool_rows = max(
            2 * max_batch, min(max_batch * (max_batch + 1) // 2, 2**29 // row_bytes)
        )
        self.batch_sizes: Counter[int] = Counter()  # decode steps by rows decoded in the step
        self.counts: Counter[str] = Counter()  # requests, prefills, merges, errors

    # -- any thread -------------------------------------------------------------------------
    def submit(self, job: Job, stream: bool) -> None:
        p = job.params
        key = (p.temperature, p.top_k, p.top_p)
        sampler = self._samplers.get(key) or self._samplers.setdefault(key, make_sampler(*key))
        rows = [
            _Row(job, k, self.lm.tokenizer.decode, sampler, stream)
            for k in range(len(job.prompts) * job.n)
        ]
        with self._cv:
            self.counts["requests"] += 1
            if p.max_tokens == 0:
                for r in rows:
                    r.finish = "length"
                    self._finish(r)
                return
            self._waiting.extend(rows)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): its rows free their slots at the next step."""
        job.cancelled = True
        with self._cv:
            self._cv.notify()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {
                "max_batch": self.max_batch,
                "running": sum(len(g.live()) for g in self._groups),
                "waiting": len(self._waiting),
                "groups": len(self._groups),
                "decode_steps": sum(self.batch_sizes.values()),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                **dict(self.counts),
            }

    # -- the model thread -------------------------------------------------------------------
    def run(self, stop: Callable[[], bool] = lambda: False, poll: float = 0.2) -> None:
        """Serve until stop() is true; sleeps while there is nothing to do."""
        while not stop():
            if not self.step():
                with self._cv:
                    if not self._waiting:
                        self._cv.wait(poll)

    def step(self) -> bool:
        """Admit waiting rows, then one decode step of every group; False when idle."""
        try:
            self._admit()
            if not self._groups:
                return False
            decoded = 0
            for g in self._groups:
                n, ended = g.step()
                decoded += n
                for r in ended:
                    self._finish(r)
            with self._cv:
                self.batch_sizes[decoded] += 1
            self._retire([g for g in self._groups if not g.live()])
        except Exception:  # a framework failure must not take the server down
            log.exception("generation failed; failing the running requests")
            self._fail_all("the model failed while generating (see the server log)")
        return True

    def _admit(self) -> None:
        live = sum(len(g.live()) for g in self._groups)
        with self._cv:
            rows = []
            while self._waiting and live + len(rows) < self.max_batch:
                r = self._waiting.popleft()
                if r.job.cancelled:
                    r.finish = "cancelled"
                    self._finish(r)
                else:
                    rows.append(r)
        if rows:
            self.counts["prefills"] += 1
            self._groups.append(self._group(rows, [r.prompt for r in rows]))
        if len(self._groups) > 1 or any(map(_mostly_done, self._groups)):
            self._merge()

    def _merge(self) -> None:
        """Fewer groups, fewer decode calls per step. Groups whose live windows are short
        (young ones: a prompt and a few tokens) are merged whenever there are two, by
        re-prefilling those windows, which costs about a decode step; past `max_groups`, or
        when a group decodes mostly finished rows, all but the group holding the most context
        are merged."""
        cost = [sum(len(g.ctx.window(b)) for b in g.live()) for g in self._groups]
        cheap = [g for g, c in zip(self._groups, cost) if c <= 8 * self.max_batch]
        if len(self._groups) > self.max_groups or any(map(_mostly_done, self._groups)):
            heavy = [-1 if _mostly_done(g) else c for g, c in zip(self._groups, cost)]
            keep = self._groups[int(np.argmax(heavy))] if max(heavy) >= 0 else None
            merged = [g for g in self._groups if g is not keep]
        else:
            merged = cheap
        if len(merged) < 2 and not any(map(_mostly_done, merged)):
            return  # re-prefilling one healthy group alone gains nothing
        rows, windows = [], []
        for g in merged:
            for b in g.live():
                rows.append(g.rows[b])
                windows.append(g.ctx.window(b).tolist())
        self.counts["merges"] += 1
        self._retire(merged)
        if rows:
            self._groups.append(self._group(rows, windows))

    def _group(self, rows: list[_Row], windows: list[list[int]]) -> _Group:
        return _Group(self.lm, rows, windows, self.keep, self._caches)

    def _retire(self, groups: list[_Group]) -> None:
        """Drop groups, keeping their caches for reuse by batch size (allocating a cache is
        slow, and MLX traces its decode step once per cache) within a memory bound."""
        for g in groups:
            self._caches.setdefault(g.ctx.cache_rows, g.ctx.cache)
        while sum(self._caches) > self._pool_rows:
            del self._caches[min(self._caches)]
        self._groups = [g for g in self._groups if all(g is not x for x in groups)]

    def _finish(self, r: _Row) -> None:
        job = r.job
        text, n = r.result()
        if r.finish != "cancelled" and r.sent < len(text):  # text held back for stop strings
            r._out(text[r.sent :])
        job.completion_tokens += n
        job.emit(("done", r.k, text, r.finish, n))
        job.remaining -= 1
        if job.remaining == 0:
            self._log(job)

    def _fail_all(self, message: str) -> None:
        jobs = {id(r.job): r.job for g in self._groups for r in g.rows}
        self._groups = []
        for job in jobs.values():
            job.cancelled = True
            job.emit(("error", message))

    def _log(self, job: Job) -> None:
        now = time.perf_counter()
        ttft = (job.t_first or now) - job.t_arrival
        secs = now - job.t_arrival
        log.info(
            "%s prompt %d tokens, completion %d tokens, ttft %.1f ms, %.1f tokens/s%s",
            job.id,
            sum(len(p) for p in job.prompts),
            job.completion_tokens,
            ttft * 1e3,
            job.completion_tokens / max(secs, 1e-9),
            ", cancelled" if job.cancelled else "",
        )


# ---- the HTTP API -----------------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(1.0, ge=0)
    top_p: float | None = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(0, ge=0)  # an extension (mlx-lm, vLLM have it too)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    echo: bool | None = False
    user: str | None = None
    # OpenAI fields accepted at their defaults only
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(
    engine: Engine, model_name: str, max_tokens_limit: int = 2048, stream_interval: float = 0.004
):
    """The FastAPI app: /v1/completions, /v1/models, /v1/stats, /health."""
    lm = engine.lm
    block = lm.spec.block_size
    created = int(time.time())

    app = FastAPI(title="polygpt", docs_url=None, redoc_url=None)
    relay = _Relay(stream_interval)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            param = ".".join(loc) or None
            msg = f"{param or 'body'}: {e.get('msg', 'invalid value')}"
        return JSONResponse(_error_body(msg, "invalid_request_error", param), status_code=400)

    @app.exception_handler(BadRequest)
    async def _bad(request, exc: BadRequest):
        body = _error_body(exc.message, "invalid_request_error", exc.param)
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return JSONResponse(
            _error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(_error_body("internal server error", "server_error"), 500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "polygpt"}
        return {"object": "list", "data": [card]}

    @app.get("/v1/stats")
    async def stats():
        return engine.stats()

    def check(req: CompletionRequest) -> tuple[list[str], list[list[int]], Params]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise BadRequest("prompt: give at least one prompt", "prompt")
        for name, default in (("logprobs", None), ("suffix", None), ("logit_bias", None)):
            if getattr(req, name) not in (default, {}):
                raise BadRequest(f"{name} is not supported by this server", name)
        if req.best_of not in (None, 1):
            raise BadRequest("best_of is not supported by this server", "best_of")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0):
                raise BadRequest(f"{name} is not supported by this server", name)
        n = req.n or 1
        if len(prompts) * n > engine.max_batch:
            raise BadRequest(
                f"n x prompts = {len(prompts) * n} choices; this server runs at most "
                f"{engine.max_batch} per request (--max-batch)",
                "n",
            )
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens > max_tokens_limit:
            raise BadRequest(
                f"max_tokens {max_tokens} is over this server's limit of {max_tokens_limit}",
                "max_tokens",
            )
        ids = []
        for p in prompts:
            try:
                t = lm.encode(p)
            except PolygptError as e:
                raise BadRequest(f"prompt: {e}", "prompt") from None
            if not t:
                raise BadRequest("prompt: the prompt is empty (give at least one token)", "prompt")
            if len(t) > block:
                raise BadRequest(
                    f"prompt: {len(t)} tokens, longer than the model's context ({block})",
                    "prompt",
                )
            ids.append(t)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        params = Params(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or 0,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=secrets.randbelow(2**31) if req.seed is None else req.seed,
            stop=[s for s in stop if s],
        )
        return prompts, ids, params

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts, ids, params = check(req)
        n = req.n or 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(ids, n, params, relay.sender(loop, queue))
        base = {"id": job.id, "object": "text_completion", "created": int(time.time())}
        base["model"] = model_name
        usage_prompt = sum(len(t) for t in ids)
        echo = [prompts[k // n] if req.echo else "" for k in range(len(prompts) * n)]
        engine.submit(job, stream=bool(req.stream))

        def usage() -> dict[str, int]:
            c = job.completion_tokens
            return {"prompt_tokens": usage_prompt, "completion_tokens": c,
                    "total_tokens": usage_prompt + c}  # fmt: skip

        def choice(k: int, text: str, finish: str | None) -> dict:
            return {"text": text, "index": k, "logprobs": None, "finish_reason": finish}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # the chunk around its text, serialized once (json.dumps per token costs)
            head, tail = _sse({**base, "choices": [choice(-1, "\0", None)]}).split('"\\u0000"')
            tail_k = [tail.replace("-1", str(k), 1) for k in range(len(echo))]

            async def events():
                done = False
                try:
                    for k, text in enumerate(echo):
                        if text:
                            yield _sse({**base, "choices": [choice(k, text, None)]})
                    left = len(echo)
                    while left:
                        events = [await queue.get()]
                        while not queue.empty():  # one write for what is ready
                            events.append(queue.get_nowait())
                        out = []
                        for ev in events:
                            if ev[0] == "text":
                                k = ev[1]
                                out.append(head + json.dumps(ev[2]) + tail_k[k])
                            elif ev[0] == "done":
                                left -= 1
                                out.append(_sse({**base, "choices": [choice(ev[1], "", ev[3])]}))
                            else:
                                out.append(_sse(_error_body(ev[1], "server_error")))
                                left = 0
                                break
                        yield "".join(out)
                    done = True
                    if include_usage:
                        yield _sse({**base, "choices": [], "usage": usage()})
                    yield "data: [DONE]\n\n"
                finally:
                    if not done:  # the client went away: free the slots
                        engine.cancel(job)

            return StreamingResponse(events(), media_type="text/event-stream")

        texts: dict[int, tuple[str, str]] = {}
        try:
            while len(texts) < len(echo):
                try:
                    ev = await asyncio.wait_for(queue.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(job)
                        return JSONResponse(_error_body("client disconnected", "cancelled"), 499)
                    continue
                if ev[0] == "done":
                    texts[ev[1]] = (ev[2], ev[3])
                elif ev[0] == "error":
                    return JSONResponse(_error_body(ev[1], "server_error"), 500)
        finally:
            if len(texts) < len(echo):
                engine.cancel(job)
        choices = [choice(k, echo[k] + texts[k][0], texts[k][1]) for k in range(len(echo))]
        return {**base, "choices": choices, "usage": usage()}

    return app


class _Relay:
    """Events from the model thread to the requests' asyncio queues, in bursts: at most one
    loop wake-up per `interval` seconds. Every decode step emits a token for every row, and
    handing each to its client as its own write cost more CPU than the step itself on a small
    machine; a burst becomes one write per client (each token still its own SSE chunk)."""

    def __init__(self, interval: float = 0.0):
        self.interval = interval
        self._pending: deque = deque()
        self._scheduled = False
        self._last = 0.0  # when the loop last drained

    def sender(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable:
        def send(event) -> None:  # the model thread
            self._pending.append((queue, event))
            if not self._scheduled:
                self._scheduled = True
                delay = self._last + self.interval - time.monotonic()
                with contextlib.suppress(RuntimeError):  # the loop closed: shutting down
                    loop.call_soon_threadsafe(self._wake, loop, delay)

        return send

    def _wake(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:  # the event loop
        if delay > 0:
            loop.call_later(delay, self._flush)
        else:
            self._flush()

    def _flush(self) -> None:  # the event loop
        self._last = time.monotonic()
        self._scheduled = False  # before draining: an event sent from now on schedules anew
        while self._pending:
            queue, event = self._pending.popleft()
            queue.put_nowait(event)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# ---- running it -------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the address is known before uvicorn runs."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise PolygptError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve(
    checkpoint: str,
    backend: str | None = None,
    device: str = "auto",
    precision: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_tokens_limit: int = 2048,
    model_name: str | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Load the checkpoint, serve until Ctrl-C / SIGTERM. The model runs in this thread."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    lm = inference.load(checkpoint, backend=backend, device=device, precision=precision)
    engine = Engine(lm, max_batch=max_batch)
    name = model_name or Path(checkpoint).resolve().name
    app = create_app(engine, name, max_tokens_limit)
    sock = bind(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    h, p = sock.getsockname()[:2]
    url = f"http://{h if ':' not in h else f'[{h}]'}:{p}/v1"
    log.info(
        "serving %s (%s on %s, %s, max batch %d) at %s",
        name,
        lm.backend.name,
        lm.backend.device,
        lm.precision,
        max_batch,
        url,
    )
    if ready is not None:
        ready(url)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as Ctrl-C does
    # The model thread drops the GIL in every framework op and must get it back from the event
    # loop thread: at the default 5 ms switch interval a decode step waited that long per op.
    sys.setswitchinterval(5e-4)
    try:
        engine.run(stop=lambda: not thread.is_alive())
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        server.should_exit = True
        thread.join(timeout=5)
