"""`polygpt serve`: a checkpoint behind an OpenAI-compatible HTTP API, on the generation engine.

Two processes. The engine process (engine_process.py, started with spawn) owns the backend
and runs the engine (polygpt/engine.py: continuous batching on a slot cache, one decode call
per step for every running request); this process runs uvicorn's event loop and never touches
a framework, so `/health` answers during generation and the web server shares no interpreter
lock with the model. A request is validated and tokenized here, becomes one engine request per
choice (prompts x n), and each engine step's events come back in one pipe message per part
(admitting, decoding), handed to the jobs' asyncio queues and relayed as JSON or as server-sent
events. Ctrl-C / SIGTERM drain the requests in flight, then stop the engine; a dead engine
fails every open request and stops the server with an error.

Same text as `polygpt sample`: choice k of a request (prompt k // n, sample k % n) samples from
the random stream (seed, k), as row k of `sample`'s batch does, and the engine's per-row rules
make its tokens independent of what else is running (up to float rounding of batched matmuls).

Endpoints: /v1/completions (text or token-id prompts, echo, logprobs, streamed too, prompt
log-probabilities with `echo`, as evaluation harnesses use), /v1/chat/completions (a plain
role template, `--chat-template FILE`), /v1/models, /v1/stats (engine counters and time per
phase), /health.
Backpressure: at most `--max-queue` requests wait for a row, beyond that a 429 with
Retry-After; `--request-timeout` bounds a request's time; a client that goes away frees its
rows at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from polygpt import checkpoints
from polygpt import engine as eng
from polygpt import tokenizer as tok
from polygpt.engine_process import EngineClient, EngineDead
from polygpt.errors import PolygptError

log = logging.getLogger("polygpt.serve")

MAX_LOGPROBS = 20  # top log-probabilities per token, OpenAI's bound


# ---- request bodies -----------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    # ranges are the engine's to check (engine.check_request), once
    max_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = 0  # an extension (mlx-lm, vLLM have it too)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields accepted at their defaults only
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Common):
    # text, texts, token ids or lists of token ids (checked in prompt_ids, to name the problem)
    prompt: str | list[Any]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool fields: not used by a plain template
    role: str
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- the chat template --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """Messages -> one prompt: each message as `message` (str.format with role and content),
    then `generation` (the assistant's turn begins); `stop` ends the turn.

    A file (`--chat-template FILE`) is TOML with any of these keys, e.g.
    message = "{role}: {content}\\n"; generation = "assistant:"; stop = ["\\nuser:"]."""

    message: str = "{role}: {content}\n"
    generation: str = "assistant:"
    stop: tuple[str, ...] = ("\nuser:",)

    @classmethod
    def load(cls, path: str | Path | None) -> ChatTemplate:
        if path is None:
            return cls()
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise PolygptError(f"cannot read the chat template {path}: {e}") from None
        unknown = set(data) - {"message", "generation", "stop"}
        if unknown:
            raise PolygptError(f"{path}: unknown chat template keys: {', '.join(sorted(unknown))}")
        t = cls(**{**data, "stop": tuple(data.get("stop", cls.stop))})
        try:
            t.render([ChatMessage(role="user", content="x")])
        except (KeyError, IndexError, ValueError) as e:
            raise PolygptError(f"{path}: the message template has a bad field: {e}") from None
        return t

    def render(self, messages: list[ChatMessage]) -> str:
        body = "".join(self.message.format(role=m.role, content=m.content) for m in messages)
        return body + self.generation


# ---- validation: a request body -> the work it asks for ---------------------------------------


@dataclass
class Limits:
    max_batch: int
    max_tokens: int
    block: int
    vocab: int  # token ids the tokenizer knows: 0..vocab-1


@dataclass
class Work:
    """What one HTTP request asks of the engine, validated."""

    kind: Literal["text_completion", "chat.completion"]
    prompts: list[str]
    ids: list[list[int]]
    n: int
    settings: dict[str, Any]  # engine.Request fields shared by every choice
    max_tokens: list[int]  # per prompt
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: int | None = None  # top-N per token; None: no log-probabilities

    @property
    def choices(self) -> int:
        return len(self.ids) * self.n


def prompt_ids(prompt: str | list, lm, limits: Limits) -> tuple[list[str], list[list[int]]]:
    """The prompts as text and as token ids. `prompt` is a string, a list of strings, a list of
    token ids, or a list of lists of token ids (what lm-eval's local-completions sends)."""
    if isinstance(prompt, str):
        items = [prompt]
    elif not prompt:
        raise BadRequest("prompt: the list is empty; give at least one prompt", "prompt")
    elif all(isinstance(x, (str, list)) for x in prompt):
        items = list(prompt)
    elif not any(isinstance(x, (str, list)) for x in prompt):
        items = [prompt]  # one prompt of token ids
    else:
        raise BadRequest(
            "prompt: give a string, a list of strings, a list of token ids or a list of lists "
            "of token ids, not a mix",
            "prompt",
        )
    texts, ids = [], []
    for item in items:
        try:
            t = lm.encode(item) if isinstance(item, str) else _token_ids(item, limits.vocab)
            eng.check_prompt(t, limits.block)
        except PolygptError as e:
            raise BadRequest(f"prompt: {e}", "prompt") from None
        texts.append(item if isinstance(item, str) else lm.tokenizer.decode(t))
        ids.append(t)
    return texts, ids


def _token_ids(item: list, vocab: int) -> list[int]:
    for x in item:
        if isinstance(x, bool) or not isinstance(x, int):
            raise PolygptError(f"token ids must be integers, got {json.dumps(x)}")
        if not 0 <= x < vocab:
            raise PolygptError(f"token id {x} is outside the vocabulary (0..{vocab - 1})")
    return item


def _max_tokens(asked: int | None, ids: list[list[int]], limits: Limits) -> list[int]:
    """Per prompt: what was asked, or (none asked) the rest of the context."""
    if asked is not None:
        return [asked] * len(ids)
    return [min(limits.block - len(t), limits.max_tokens) for t in ids]


def _check_common(req: _Common, ids: list[list[int]], limits: Limits, max_tokens: int | None):
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0):
            raise BadRequest(f"{name} is not supported by this server", name)
    if req.logit_bias not in (None, {}):
        raise BadRequest("logit_bias is not supported by this server", "logit_bias")
    n = req.n or 1
    if len(ids) * n > limits.max_batch:
        raise BadRequest(
            f"n x prompts = {len(ids) * n} choices; this server runs at most "
            f"{limits.max_batch} per request (--max-batch)",
            "n",
        )
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise BadRequest(
            f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
            "max_tokens",
        )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    settings = dict(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=req.top_k or 0,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=secrets.randbelow(2**31) if req.seed is None else req.seed,
        stop=[s for s in stop if s],
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return n, settings, include_usage


def check_completion(req: CompletionRequest, lm, limits: Limits) -> Work:
    if req.suffix is not None:
        raise BadRequest("suffix is not supported by this server", "suffix")
    if req.best_of not in (None, 1):
        raise BadRequest("best_of is not supported by this server", "best_of")
    prompts, ids = prompt_ids(req.prompt, lm, limits)
    n, settings, usage = _check_common(req, ids, limits, req.max_tokens)
    return Work(
        "text_completion", prompts, ids, n, settings, _max_tokens(req.max_tokens, ids, limits),
        bool(req.stream), usage, echo=bool(req.echo), logprobs=req.logprobs,
    )  # fmt: skip


def check_chat(req: ChatRequest, lm, limits: Limits, template: ChatTemplate) -> Work:
    if not req.messages:
        raise BadRequest("messages: give at least one message", "messages")
    if req.top_logprobs and not req.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
    prompts, ids = prompt_ids(template.render(req.messages), lm, limits)
    n, settings, usage = _check_common(req, ids, limits, max_tokens)
    if req.stop is None:  # a chat turn ends at a stop string
        settings["stop"] = list(template.stop)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return Work(
        "chat.completion", prompts, ids, n, settings, _max_tokens(max_tokens, ids, limits),
        bool(req.stream), usage, logprobs=logprobs,
    )  # fmt: skip


# ---- a job: one HTTP request's engine requests and their events --------------------------------


@dataclass
class Latency:
    """Each finished request's time from its arrival here to its first token from the engine
    (`ttft`: what the server adds to a client's time to first token), and the part of it spent
    waiting for its prefill to begin (`queue`: the step in flight, a free row); in ms to 2
    significant digits."""

    ttft: Counter = field(default_factory=Counter)
    queue: Counter = field(default_factory=Counter)

    def record(self, ttft: float, queue: float) -> None:
        self.ttft[float(f"{ttft * 1e3:.2g}")] += 1
        self.queue[float(f"{queue * 1e3:.2g}")] += 1

    def histograms(self) -> dict[str, dict[str, int]]:
        return {
            f"{name}_ms": {f"{k:g}": v for k, v in sorted(counts.items())}
            for name, counts in (("ttft", self.ttft), ("queue", self.queue))
        }


class Job:
    """The engine requests of one HTTP request (choice k: prompt k // n, random stream k) and
    the queue their events arrive on: one list of (k, event) per engine step."""

    def __init__(self, work: Work, prefix: str, latency: Latency | None = None):
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.work = work
        self.latency = latency  # the server's histograms
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rids: list[int] = []  # the engine's ids of the requests, once submitted
        self.finished: dict[int, eng.Finished] = {}
        self.requests = [
            eng.Request(
                prompt=work.ids[k // work.n],
                max_tokens=work.max_tokens[k // work.n],
                seed_stream=k,
                stream_text=work.stream,
                logprobs=work.logprobs,
                prompt_logprobs=work.echo and work.logprobs is not None,
                **work.settings,
            )
            for k in range(work.choices)
        ]
        self.t_arrival = time.perf_counter()

    @property
    def completion_tokens(self) -> int:
        return sum(len(f.tokens) for f in self.finished.values())

    @property
    def prompt_tokens(self) -> int:
        return sum(len(t) for t in self.work.ids)

    def usage(self) -> dict[str, int]:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def log(self) -> None:
        now = time.perf_counter()
        firsts = [r.t_first for r in self.requests if r.t_first is not None]
        ttft = (min(firsts) if firsts else now) - self.t_arrival
        cancelled = any(f.reason == "cancelled" for f in self.finished.values())
        if firsts and not cancelled and self.latency is not None:
            admitted = min(r.t_admit for r in self.requests if r.t_admit is not None)
            self.latency.record(ttft, admitted - self.t_arrival)
        log.info(
            "%s prompt %d tokens, completion %d tokens, ttft %.1f ms, %.1f tokens/s%s",
            self.id,
            self.prompt_tokens,
            self.completion_tokens,
            ttft * 1e3,
            self.completion_tokens / max(now - self.t_arrival, 1e-9),
            ", cancelled" if cancelled else "",
        )

    def take(self, events: list) -> None:
        """One engine step's events for this job (the event loop)."""
        for k, ev in events:
            if isinstance(ev, eng.Finished):
                self.finished[k] = ev
                if len(self.finished) == len(self.requests):
                    self.log()
        self.queue.put_nowait(events)


def deliver(by_job: dict) -> None:
    for job, events in by_job.items():
        job.take(events)


# ---- responses ----------------------------------------------------------------------------------


def _completion_logprobs(lm, echo_ids: list[int], f: eng.Finished) -> dict:
    """OpenAI's completions `logprobs` object of a whole choice (the echoed prompt first, its
    first token without a log-probability)."""
    ids, lps = [], []
    if echo_ids:
        ids.extend(echo_ids)
        lps.append(None)
        lps.extend(f.prompt_logprobs or [])
    ids.extend(f.tokens)
    lps.extend(f.logprobs or [])
    return _logprobs_object(lm, ids, lps, 0)


def _logprobs_object(lm, ids: list[int], lps: list, offset0: int) -> dict:
    """Per token its text, log-probability, top alternatives and character offset."""
    decode = lm.tokenizer.decode
    tokens = [decode([t]) for t in ids]
    offsets, at = [], offset0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [None if x is None else x[0] for x in lps],
        "top_logprobs": [None if x is None else {decode([i]): v for i, v in x[1]} for x in lps],
        "text_offset": offsets,
    }


def _chat_logprobs(lm, tokens: list[int], lps: list) -> dict:
    decode = lm.tokenizer.decode

    def entry(tok: int, lp: float) -> dict:
        s = decode([tok])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
            for t, (lp, top) in zip(tokens, lps or [])
        ]
    }


def _choice(job: Job, lm, k: int, f: eng.Finished) -> dict:
    work = job.work
    if work.kind == "chat.completion":
        lp = _chat_logprobs(lm, f.tokens, f.logprobs) if work.logprobs is not None else None
        msg = {"role": "assistant", "content": f.text}
        return {"index": k, "message": msg, "logprobs": lp, "finish_reason": f.reason}
    prompt = work.prompts[k // work.n] if work.echo else ""
    lp = None
    if work.logprobs is not None:
        lp = _completion_logprobs(lm, work.ids[k // work.n] if work.echo else [], f)
    return {"text": prompt + f.text, "index": k, "logprobs": lp, "finish_reason": f.reason}


def _chunk(job: Job, base: dict, k: int, text: str | None, finish: str | None) -> dict:
    if job.work.kind == "chat.completion":
        delta = {} if text is None else {"content": text}
        c = {"index": k, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        c = {"text": text or "", "index": k, "logprobs": None, "finish_reason": finish}
    return {**base, "choices": [c]}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _TextChunks:
    """Choice k's text chunk as an SSE line: the JSON around the text serialized once per
    choice, so a token costs one json.dumps of its text (per-token dict dumps were a sizeable
    share of a 16-client server's CPU)."""

    def __init__(self, job: Job, base: dict):
        self.job, self.base = job, base
        self._parts: dict[int, tuple[str, str]] = {}

    def __call__(self, k: int, ev: eng.TextChunk) -> str:
        parts = self._parts.get(k)
        if parts is None:
            whole = _sse(_chunk(self.job, self.base, k, "\0", None))
            head, tail = whole.split(json.dumps("\0"), 1)
            parts = self._parts[k] = (head, tail)
        return parts[0] + json.dumps(ev.text) + parts[1]


class _LogprobChunks:
    """Choice k's text chunk with the log-probabilities of the tokens it completes, in the
    format of the non-streamed choice (completions: character offsets run on per choice)."""

    def __init__(self, job: Job, base: dict, lm):
        self.job, self.base, self.lm = job, base, lm
        self.offset: dict[int, int] = {}

    def __call__(self, k: int, ev: eng.TextChunk | eng.PromptScored) -> str:
        work, lm = self.job.work, self.lm
        if isinstance(ev, eng.PromptScored):  # echo: the prompt first, its first token unscored
            text, ids, lps = work.prompts[k // work.n], work.ids[k // work.n], [None, *ev.logprobs]
        else:
            text, ids, lps = ev.text, ev.tokens, ev.logprobs or []
        c = _chunk(self.job, self.base, k, text, None)
        if work.kind == "chat.completion":
            c["choices"][0]["logprobs"] = _chat_logprobs(lm, ids, lps)
        else:
            lp = _logprobs_object(lm, ids, lps, self.offset.get(k, 0))
            self.offset[k] = self.offset.get(k, 0) + sum(map(len, lp["tokens"]))
            c["choices"][0]["logprobs"] = lp
        return _sse(c)


class HttpTimer:
    """Seconds the event loop spends turning events into responses (/v1/stats' "http")."""

    def __init__(self):
        self.seconds = 0.0

    @contextlib.contextmanager
    def timed(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t


async def stream_events(job: Job, base: dict, engine, timer, timeout, lm):
    """The server-sent events of a streaming job; cancels it if the client goes away."""
    work, left, done = job.work, job.work.choices, False
    deadline = time.monotonic() + timeout if timeout else None
    text_chunk = _TextChunks(job, base) if work.logprobs is None else _LogprobChunks(job, base, lm)
    try:
        if work.kind == "chat.completion":  # the first chunk of each choice names the role
            for k in range(work.choices):
                first = _chunk(job, base, k, "", None)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield _sse(first)
        elif work.echo and work.logprobs is None:  # with logprobs: on PromptScored
            for k in range(work.choices):
                yield _sse(_chunk(job, base, k, work.prompts[k // work.n], None))
        while left:
            events = await _next_events(job.queue, deadline)
            if events is None:
                msg = f"the request took longer than --request-timeout ({timeout:g} s)"
                yield _sse(_error_body(msg, "timeout"))
                break
            with timer.timed():
                out = []
                for k, ev in events:
                    if isinstance(ev, (eng.TextChunk, eng.PromptScored)):
                        out.append(text_chunk(k, ev))
                    elif isinstance(ev, eng.Finished):
                        left -= 1
                        out.append(_sse(_chunk(job, base, k, None, ev.reason)))
                    else:
                        out.append(_sse(_error_body(ev.message, "server_error")))
                        left = 0
                        break
            yield "".join(out)
        else:
            done = True
            if work.include_usage:
                yield _sse({**base, "choices": [], "usage": job.usage()})
            yield "data: [DONE]\n\n"
    finally:
        if not done:  # the client went away, or the time ran out: free the rows
            _cancel(engine, job)


def _cancel(engine, job: Job) -> None:
    with contextlib.suppress(EngineDead):  # a dead engine has nothing left to cancel
        engine.cancel(job.rids)


async def _next_events(queue: asyncio.Queue, deadline: float | None) -> list | None:
    """What is ready on the queue (at least one step's events), or None past the deadline."""
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        events = list(await asyncio.wait_for(queue.get(), wait))
    except asyncio.TimeoutError:
        return None
    while not queue.empty():  # one write for what is ready
        events.extend(queue.get_nowait())
    return events


async def collect(job: Job, request: Request, engine, timeout) -> JSONResponse | None:
    """Wait for every choice of a non-streaming job; an error response, or None when done."""
    deadline = time.monotonic() + timeout if timeout else None
    try:
        while len(job.finished) < job.work.choices:
            try:
                events = await asyncio.wait_for(job.queue.get(), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse(_error_body("client disconnected", "cancelled"), 499)
                if deadline is not None and time.monotonic() > deadline:
                    msg = f"the request took longer than --request-timeout ({timeout:g} s)"
                    return JSONResponse(_error_body(msg, "timeout"), 504)
                continue
            for _, ev in events:
                if isinstance(ev, eng.Failed):
                    return JSONResponse(_error_body(ev.message, "server_error"), 500)
        return None
    finally:
        if len(job.finished) < job.work.choices:
            _cancel(engine, job)


# ---- the app ------------------------------------------------------------------------------------


@dataclass
class Text:
    """The tokenizer, for the HTTP side (the model lives in the engine process)."""

    tokenizer: Any

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


@dataclass
class ServerState:
    """What the routes share: the engine client, the tokenizer and the server's limits."""

    engine: EngineClient
    lm: Text
    model_name: str
    limits: Limits
    template: ChatTemplate = field(default_factory=ChatTemplate)
    request_timeout: float | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    timer: HttpTimer = field(default_factory=HttpTimer)
    latency: Latency = field(default_factory=Latency)

    async def stats(self) -> dict:
        """The engine's counters and time per phase, the HTTP side's (reading the engine's
        steps: `relay`; turning events into responses: `http`) and the time-to-first-token
        and queue-time histograms (`ttft_ms`, `queue_ms`: {ms: requests})."""
        st = await self.engine.stats()
        relay = round(self.engine.seconds, 3)
        st["seconds"] = {
            **st.get("seconds", {}),
            "relay": relay,
            "http": round(self.timer.seconds, 3),
        }
        st.update(self.latency.histograms())
        st["engine_pid"] = self.engine.proc.pid
        return st


def _install_error_handlers(app: FastAPI) -> None:
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

    @app.exception_handler(eng.InvalidRequest)
    async def _invalid_request(request, exc: eng.InvalidRequest):
        body = _error_body(str(exc), "invalid_request_error", exc.param)  # names the field
        return JSONResponse(body, status_code=400)

    @app.exception_handler(eng.QueueFull)
    async def _busy(request, exc: eng.QueueFull):
        body = _error_body(f"{exc}: retry later", "rate_limit_error", code="queue_full")
        return JSONResponse(body, status_code=429, headers={"Retry-After": "1"})

    @app.exception_handler(EngineDead)
    async def _dead(request, exc: EngineDead):
        return JSONResponse(_error_body(str(exc), "server_error", code="engine_dead"), 503)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        body = _error_body(str(exc.detail), "invalid_request_error")
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(_error_body("internal server error", "server_error"), 500)


async def _respond(state: ServerState, work: Work, request: Request):
    """Submit a validated job and answer it: a stream of chunks or one JSON object."""
    prefix = "chatcmpl" if work.kind == "chat.completion" else "cmpl"
    job = Job(work, prefix, state.latency)
    base = {"id": job.id, "object": work.kind, "created": int(time.time())}
    base["model"] = state.model_name
    # InvalidRequest: 400, QueueFull: 429, EngineDead: 503
    job.rids = state.engine.submit_many(job.requests, job)
    timeout = state.request_timeout
    if work.stream:
        chunk_base = {**base, "object": f"{work.kind}.chunk"} if work.kind != "text_completion" \
            else base  # fmt: skip
        events = stream_events(job, chunk_base, state.engine, state.timer, timeout, state.lm)
        return StreamingResponse(events, media_type="text/event-stream")
    error = await collect(job, request, state.engine, timeout)
    if error is not None:
        return error
    with state.timer.timed():
        choices = [_choice(job, state.lm, k, job.finished[k]) for k in range(work.choices)]
        return {**base, "choices": choices, "usage": job.usage()}


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /v1/stats, /health."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.engine.deliver = deliver
        state.engine.attach(asyncio.get_running_loop())  # each step's message read here
        yield

    app = FastAPI(title="polygpt", docs_url=None, redoc_url=None, lifespan=lifespan)
    _install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": state.model_name, "object": "model", "created": state.created}
        return {"object": "list", "data": [{**card, "owned_by": "polygpt"}]}

    @app.get("/v1/stats")
    async def stats():
        return await state.stats()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        work = check_completion(req, state.lm, state.limits)
        return await _respond(state, work, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        work = check_chat(req, state.lm, state.limits, state.template)
        return await _respond(state, work, request)

    return app


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
    max_queue: int = 64,
    request_timeout: float | None = None,
    chat_template: str | None = None,
) -> None:
    """Start the engine process, serve until Ctrl-C / SIGTERM (in-flight requests finish),
    stop the engine. A dead engine process fails the open requests and stops the server with
    an error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if max_batch < 1 or max_queue < 0:
        raise PolygptError("--max-batch must be >= 1 and --max-queue >= 0")
    template = ChatTemplate.load(chat_template)
    ckpt = checkpoints.read(checkpoint)  # a bad path fails here, before a process starts
    text = Text(tok.from_dict(ckpt.tokenizer))
    limits = Limits(max_batch, max_tokens_limit, ckpt.spec.block_size, text.tokenizer.vocab_size)
    sock = bind(host, port)
    engine = EngineClient(checkpoint, backend, device, precision, max_batch, max_queue)
    try:
        name = model_name or Path(checkpoint).resolve().name
        app = create_app(ServerState(engine, text, name, limits, template, request_timeout))
        config = uvicorn.Config(app, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        engine.on_dead = lambda: setattr(server, "should_exit", True)
        _log_serving(sock, name, engine, max_batch, ready)
        # uvicorn re-raises the signal that stopped it once it has drained: as KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            log.info("shutting down")
    finally:
        engine.close()
    if engine.dead:
        raise PolygptError(f"{engine.dead}; the server stopped")


def _log_serving(sock, name: str, engine: EngineClient, max_batch: int, ready) -> None:
    h, p = sock.getsockname()[:2]
    url = f"http://{h if ':' not in h else f'[{h}]'}:{p}/v1"
    info = engine.info
    log.info(
        "serving %s (%s on %s, %s, max batch %d; engine process %d) at %s",
        name,
        info["backend"],
        info["device"],
        info["precision"],
        max_batch,
        engine.proc.pid,
        url,
    )
    if ready is not None:
        ready(url)
