"""The generation engine in its own process, joined to the HTTP side by a pipe (vLLM's
EngineCore: the model loop never shares an interpreter lock with the web server).

The engine process (`run_engine`, started with multiprocessing's spawn) loads the model and
loops: read what the HTTP side sent (requests, cancellations, a stats question, stop), run one
engine step, send each part's events (admitting, decoding) as one message. The HTTP side
(`EngineClient`, in the server's process) reads a message in its event loop and hands each job
its events at once, so a step costs at most two pipe messages and event-loop wake-ups, whatever
the number of rows.

Messages are tuples of plain values (pickled by multiprocessing's Connection):
  HTTP -> engine: ("submit", [(rid, prompt, settings)]), ("cancel", [rid]), ("stats", token),
                  ("stop",)
  engine -> HTTP: ("ready", info) or ("error", message) once, after loading; then
                  ("step", events, running, waiting, seen) and ("stats", token, stats)
An event is (rid, TEXT, text, tokens, logprobs), (rid, SCORED, prompt_logprobs), (rid,
FINISHED, reason, tokens, text, logprobs, prompt_logprobs, t_admit, t_first) or (rid, FAILED,
message): engine.Request.tag is the rid, and the HTTP side turns them back into the engine's
events. Times are time.perf_counter(), one clock for both processes.

Failure: the engine process exits when its pipe closes (the server went away: no orphan); the
HTTP side treats a closed pipe as a dead engine and fails every open request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from typing import Any

from polygpt import engine as eng
from polygpt import inference
from polygpt.errors import PolygptError

log = logging.getLogger("polygpt.engine")

TEXT, FINISHED, FAILED, SCORED = 0, 1, 2, 3
# engine.Request fields a submit carries besides the prompt
SETTINGS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "seed_stream", "stop",
            "stream_text", "logprobs", "prompt_logprobs")  # fmt: skip


class EngineDead(PolygptError):
    """The engine process is gone (a server answers 503)."""


# ---- the engine process -------------------------------------------------------------------


def run_engine(conn, checkpoint: str, backend, device: str, precision, max_batch: int) -> None:
    """The engine process's main: load, say ready (or why not), serve the pipe until it closes
    or says stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        lm = inference.load(checkpoint, backend=backend, device=device, precision=precision)
        block = lm.spec.block_size
        engine = eng.Engine(lm.backend, lm.model, block, max_batch, decode_text=lm.tokenizer.decode)
    except PolygptError as e:
        conn.send(("error", str(e)))
        return
    info = {"backend": lm.backend.name, "device": str(lm.backend.device), "block_size": block}
    conn.send(("ready", {**info, "precision": lm.precision}))
    with contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):
        EngineCore(engine, conn).serve()  # until stop, or the server goes away


class EngineCore:
    """The engine's loop over a pipe: one message in per request batch, one out per part of a
    step."""

    def __init__(self, engine: eng.Engine, conn):
        self.engine, self.conn = engine, conn
        self.requests: dict[int, eng.Request] = {}  # by rid, until finished
        self.seen = 0  # requests read from the pipe (the HTTP side counts what it sent)
        self.reported: tuple[int, int, int] | None = None

    def serve(self) -> None:
        """Read, step, send: a message when a part of the step has events or the queue
        changed."""
        for events in self.engine.steps(feed=self._read, survive=True):
            queue = self._queue()
            if events or queue != self.reported:
                t = time.perf_counter()
                self.conn.send(("step", [self._pack(ev) for ev in events], *queue))
                self.reported = queue
                self.engine.seconds["send"] += time.perf_counter() - t
                self.engine.counts["messages"] += 1

    def _queue(self) -> tuple[int, int, int]:
        return len(self.engine.active), self.engine.waiting, self.seen

    def _read(self) -> bool:
        """Everything the pipe holds (waiting for something while idle); False on stop."""
        t = time.perf_counter()
        block = self.engine.idle()
        while self.conn.poll(None if block else 0):
            block = False
            msg = self.conn.recv()
            if msg[0] == "submit":
                self._submit(msg[1])
            elif msg[0] == "cancel":
                for rid in msg[1]:
                    if rid in self.requests:
                        self.engine.cancel(self.requests[rid])
            elif msg[0] == "stats":
                self.conn.send(("stats", msg[1], self.engine.stats()))
            elif msg[0] == "stop":
                return False
        if not block:  # time spent waiting for work is not the engine's
            self.engine.seconds["read"] += time.perf_counter() - t
        return True

    def _submit(self, batch: list) -> None:
        reqs = [eng.Request(prompt=p, tag=rid, **settings) for rid, p, settings in batch]
        self.seen += len(reqs)
        try:
            self.engine.submit_many(reqs)
        except PolygptError as e:  # validated by the HTTP side: not expected
            self.conn.send(("step", [(r.tag, FAILED, str(e)) for r in reqs], *self._queue()))
            return
        self.requests.update((r.tag, r) for r in reqs)

    def _pack(self, ev: eng.Event) -> tuple:
        rid = ev.request.tag
        if isinstance(ev, eng.TextChunk):
            return (rid, TEXT, ev.text, ev.tokens, ev.logprobs)
        if isinstance(ev, eng.PromptScored):
            return (rid, SCORED, ev.logprobs)
        self.requests.pop(rid, None)
        if isinstance(ev, eng.Finished):
            req = ev.request
            return (rid, FINISHED, ev.reason, ev.tokens, ev.text, ev.logprobs,
                    ev.prompt_logprobs, req.t_admit, req.t_first)  # fmt: skip
        return (rid, FAILED, ev.message)


# ---- the HTTP side ------------------------------------------------------------------------


class EngineClient:
    """The server's handle on the engine process: submit, cancel and stats from the event
    loop; each step's events handed to their owners through `deliver({owner: [(k, event)]})`.

    Requests are engine.Request objects kept here (the engine process has its own copies),
    known to both sides by an id, their `tag`; each has an owner (a server's job) and is its
    k-th. `max_queue` bounds the requests waiting for a row (429 beyond)."""

    def __init__(
        self,
        checkpoint,
        backend,
        device,
        precision,
        max_batch: int,
        max_queue: int,
        interval: float = 0.008,
    ):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, str(checkpoint), backend, device, precision, max_batch)
        self.proc = ctx.Process(target=run_engine, args=args, name="polygpt-engine", daemon=True)
        self.proc.start()
        child.close()  # the engine holds the only other end: its exit closes the pipe
        self.max_batch, self.max_queue = max_batch, max_queue
        self.info = self._ready()
        self.open: dict[int, tuple[eng.Request, Any, int]] = {}  # rid: (request, owner, k)
        self._rid = itertools.count()
        self.sent = 0  # requests sent to the engine
        self.running, self.waiting, self.seen = 0, 0, 0  # as the engine last reported them
        self._stats: dict[int, asyncio.Future] = {}
        self.dead: str | None = None  # why the engine is gone
        self.on_dead: Callable[[], None] = lambda: None
        self.deliver: Callable[[dict], None] = lambda job_events: None
        self.seconds = 0.0  # the event loop's time reading steps
        # Events are handed out at most once per `interval` seconds: a step every millisecond
        # would otherwise cost every client a wake-up and a socket write per step, CPU taken
        # from the engine on a small machine (a burst is one write, each token its own chunk;
        # the interval's effect on tokens/s: docs/BENCHMARKS.md, "The reference model").
        # A request's first token is not held: its job's events go out at once, alone.
        self.interval = interval
        self._pending: dict[Any, list] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0  # when events were last handed out

    def _ready(self) -> dict:
        try:
            msg = self.conn.recv()
        except EOFError:
            self.proc.join()
            raise PolygptError(
                f"the engine process exited while loading the model (exit code "
                f"{self.proc.exitcode}; see the log above)"
            ) from None
        if msg[0] == "error":
            self.proc.join()
            raise PolygptError(msg[1])
        return msg[1]

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.conn.fileno(), self._readable)

    # -- requests ------------------------------------------------------------------------------
    def submit_many(self, reqs: list[eng.Request], owner: Any) -> list[int]:
        """Send `owner`'s requests together: all of them, or none when one is invalid
        (engine.InvalidRequest, checked here by the engine's rules) or the queue has no room.
        Their ids."""
        if self.dead:
            raise EngineDead(self.dead)
        for r in reqs:
            eng.check_request(r, self.info["block_size"])
        waiting = self._waiting()
        if waiting + max(0, len(reqs) - self._free_rows()) > self.max_queue:
            raise eng.QueueFull(f"the queue is full ({waiting} requests waiting)")
        rids, batch = [], []
        for k, r in enumerate(reqs):
            r.tag = rid = next(self._rid)
            r.t_submit = time.perf_counter()
            self.open[rid] = (r, owner, k)
            batch.append((rid, r.prompt, {name: getattr(r, name) for name in SETTINGS}))
            rids.append(rid)
        self._send(("submit", batch))
        self.sent += len(reqs)
        return rids

    def _free_rows(self) -> int:
        """Rows free once the engine has read what it was sent (as it last reported)."""
        return max(0, self.max_batch - self.running - (self.sent - self.seen))

    def _waiting(self) -> int:
        """Requests waiting for a row: the engine's last count, and what it has not read yet
        beyond the rows it had free."""
        unread = self.sent - self.seen
        return self.waiting + max(0, unread - max(0, self.max_batch - self.running))

    def cancel(self, rids: list[int]) -> None:
        rids = [r for r in rids if r in self.open]
        if rids and not self.dead:
            self._send(("cancel", rids))

    async def stats(self) -> dict:
        if self.dead:
            raise EngineDead(self.dead)
        token = next(self._rid)
        fut = self._stats[token] = asyncio.get_running_loop().create_future()
        self._send(("stats", token))
        try:
            return await fut
        finally:
            self._stats.pop(token, None)

    def _send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except OSError:
            self._died()
            raise EngineDead(self.dead) from None

    # -- the event loop reads the pipe ------------------------------------------------------
    def _readable(self) -> None:
        t = time.perf_counter()
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            self._died()
        self.seconds += time.perf_counter() - t

    def _handle(self, msg) -> None:
        if msg[0] == "stats":
            if self._pending:  # what the answer counts as done has been handed out
                self._flush()
            fut = self._stats.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
            return
        _, events, self.running, self.waiting, self.seen = msg
        firsts = []  # owners of a request's first token: those go out at once
        for ev in events:
            if ev[0] not in self.open:
                continue
            req, owner, k = self.open[ev[0]]
            if req.t_first is None and ev[1] != SCORED:
                req.t_first = time.perf_counter()
                firsts.append(owner)
            if ev[1] == TEXT:
                out = eng.TextChunk(req, ev[2], ev[3], ev[4])
            elif ev[1] == SCORED:
                out = eng.PromptScored(req, ev[2])
            elif ev[1] == FINISHED:
                del self.open[ev[0]]
                req.t_admit, req.t_first = ev[7], ev[8]  # the engine's times
                out = eng.Finished(req, ev[2], ev[3], ev[4], ev[5], ev[6])
            else:
                del self.open[ev[0]]
                out = eng.Failed(req, ev[2])
            self._pending.setdefault(owner, []).append((k, out))
        if firsts:  # at once and ahead of the rest: their tasks run before the other streams'
            self.deliver({o: self._pending.pop(o) for o in dict.fromkeys(firsts)})
        if not self._pending:
            return
        delay = self._last + self.interval - time.monotonic()
        if delay <= 0:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._last = None, time.monotonic()
        pending, self._pending = self._pending, {}
        self.deliver(pending)

    def _died(self) -> None:
        """Fail every open request and every stats question; tell the server (once)."""
        if self.dead:
            return
        self.proc.join(5)  # its pipe is closed: it is exiting
        self.dead = f"the engine process died (exit code {self.proc.exitcode})"
        log.error("%s: failing %d open requests", self.dead, len(self.open))
        with contextlib.suppress(RuntimeError, ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
        for req, owner, k in self.open.values():
            self._pending.setdefault(owner, []).append((k, eng.Failed(req, self.dead)))
        self.open.clear()
        for fut in self._stats.values():
            if not fut.done():
                fut.set_exception(EngineDead(self.dead))
        self._flush()
        self.on_dead()

    def close(self, timeout: float = 30) -> int | None:
        """Stop the engine process and wait for it; its exit code."""
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("stop",))
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        return self.proc.exitcode
