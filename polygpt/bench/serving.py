"""`polygpt bench-serve`: load-test `polygpt serve` on localhost, in each backend.

For each backend a server is started in a subprocess (its own process, as in production), then
closed-loop clients stream completions for a fixed time: one client at a time (the sequential
baseline) and N at once, alternating in rounds so that a change in the machine's load hits
both. Reported: requests/s, aggregate generated tokens/s,
time to first token and the gap between streamed tokens (p50/p99), and the speedup of N
concurrent clients over one. The clients are plain `http.client` threads (light, so they steal
little CPU from the server on a small machine) reading the server-sent events line by line.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from polygpt import checkpoints
from polygpt.config import SampleConfig
from polygpt.errors import PolygptError


class ServerProcess:
    """`polygpt serve CKPT -b BACKEND --port 0 ARGS` in a subprocess; `lines` is its log."""

    def __init__(self, checkpoint, backend: str, *args: str, timeout: float = 180):
        root = str(Path(__file__).resolve().parents[1])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        cmd = [sys.executable, "-m", "polygpt.cli", "serve", str(checkpoint), "-b", backend]
        self.proc = subprocess.Popen(
            [*cmd, "--port", "0", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self.engine_pid: int | None = None
        ready = threading.Event()

        def drain() -> None:  # read the log as it comes, so the pipe never fills
            for line in self.proc.stderr:
                self.lines.append(line)
                if self.url is None and " at http://" in line:
                    self.url = line.rsplit(" at ", 1)[1].strip()
                    if "engine process " in line:
                        self.engine_pid = int(line.split("engine process ")[1].split(")")[0])
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.close()
            log = "".join(self.lines[-20:]).strip()
            raise PolygptError(f"polygpt serve did not start ({backend}):\n{log}")
        hostport = self.url.split("//")[1].split("/")[0]
        host, port = hostport.rsplit(":", 1)
        self.host, self.port = host.strip("[]"), int(port)

    def http(self, method: str, path: str, body: str | bytes | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.read().decode()
        finally:
            conn.close()

    def stats(self) -> dict:
        status, body = self.http("GET", "/v1/stats")
        if status != 200:
            raise PolygptError(f"/v1/stats answered {status}: {body}")
        return json.loads(body)

    def close(self) -> None:
        """Stop the server (SIGTERM) and check that its engine process went with it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.check_no_orphan()

    def check_no_orphan(self, timeout: float = 30) -> None:
        """The engine process is gone within `timeout` seconds of the server (else killed, and
        an error)."""
        pid = self.engine_pid
        deadline = time.monotonic() + timeout
        while pid is not None and alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid is not None and alive(pid):
            os.kill(pid, 9)
            raise PolygptError(f"the engine process {pid} outlived the server")


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state after the command name; Z is a zombie
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): kill(pid, 0) answered
        return True


class ExternalServer:
    """An OpenAI-compatible server already running at `url` (another project's, for a side by
    side with the same clients); it has no /v1/stats, so batch sizes and the server's time to
    first token are not reported."""

    def __init__(self, url: str):
        hostport = url.split("//", 1)[-1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise PolygptError(f"--url needs http://HOST:PORT/v1, got {url!r}")
        self.url, self.host, self.port = url, host.strip("[]"), int(port)

    def stats(self) -> dict:
        return {"batch_sizes": {}, "ttft_ms": {}}

    def close(self) -> None:
        pass


@dataclass
class Request:
    sent: float
    first: float | None  # first text chunk
    times: list[float]  # every text chunk
    tokens: int
    done: float


# A chunk with text, and the usage chunk: found in the bytes, so that a client parses one JSON
# object a request, not one a token (16 client threads share one interpreter lock).
_TEXT = re.compile(rb'"text"\s*:\s*"[^"]')
_USAGE = re.compile(rb'"usage"\s*:\s*\{')


def stream_once(host: str, port: int, body: dict, conn=None) -> Request:
    """One streaming completion; chunk arrival times and the usage count."""
    conn = conn or http.client.HTTPConnection(host, port, timeout=300)
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
    sent = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", payload, {"Content-Type": "application/json"})
        r = conn.getresponse()
    except http.client.RemoteDisconnected:  # a server that closed a kept-alive connection
        conn.close()
        sent = time.perf_counter()
        conn.request("POST", "/v1/completions", payload, {"Content-Type": "application/json"})
        r = conn.getresponse()
    if r.status != 200:
        raise PolygptError(f"the server answered {r.status}: {r.read().decode()[:200]}")
    times, tokens = [], 0
    while True:
        line = r.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        if _TEXT.search(data):
            times.append(time.perf_counter())
        elif _USAGE.search(data):
            tokens = json.loads(data)["usage"]["completion_tokens"]
    r.read()
    # a server that sends no usage chunk: one text chunk is one token
    return Request(
        sent, times[0] if times else None, times, tokens or len(times), time.perf_counter()
    )


@dataclass
class Result:
    backend: str
    clients: int
    seconds: float
    requests: int
    requests_per_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    token_p50_ms: float  # gap between streamed tokens
    token_p99_ms: float
    batch_p50: float  # rows per decode step, from the server's /v1/stats
    batch_max: int
    # arrival at the server to its first token, from /v1/stats (None: a server without it)
    server_ttft_p50_ms: float | None = None


@dataclass
class Run:
    """The raw record of one or more timed runs at one concurrency."""

    requests: list[Request]
    seconds: float
    steps: Counter  # decode steps by batch size, from the server
    ttft_ms: Counter  # requests by the server's time to first token (ms)


def run_clients(
    server: ServerProcess,
    clients: int,
    duration: float,
    body: dict,
    seed: int = 0,
    stagger: bool = False,
) -> Run:
    """`clients` closed-loop streaming clients for `duration` seconds (requests started before
    the deadline are finished and counted).

    Requests of one length keep closed-loop clients in step: all finish in the same server
    step and send the next together, a burst of arrivals each time. With `stagger`, client i's
    first request asks for (i + 1) / clients of `max_tokens`, which spreads the clients' cycles
    over one request's time from the start: arrivals one at a time, as independent users'."""
    before = server.stats()
    results: list[Request] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + duration

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=300)
        k = 0
        try:
            while time.perf_counter() < deadline:
                req = {**body, "seed": seed + 1000 * i + k}
                if k == 0 and stagger and "max_tokens" in body:
                    req["max_tokens"] = max(1, body["max_tokens"] * (i + 1) // clients)
                results.append(stream_once(server.host, server.port, req, conn))
                k += 1
        except (OSError, PolygptError, ValueError) as e:
            with lock:
                errors.append(f"client {i}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise PolygptError(f"{len(errors)} clients failed, e.g. {errors[0]}")
    after = server.stats()
    steps = histogram_since(before, after, "batch_sizes", int)
    ttft = histogram_since(before, after, "ttft_ms")
    return Run(results, max(r.done for r in results) - start, steps, ttft)


def histogram_since(before: dict, after: dict, key: str, kind=float) -> Counter:
    """What a /v1/stats histogram ({value: count}, JSON keys) counted between two reads."""
    was = before.get(key, {})
    return +Counter({kind(k): v - was.get(k, 0) for k, v in after.get(key, {}).items()})


def histogram_median(hist: Counter) -> float | None:
    """The median of a histogram's values (None for an empty one)."""
    return float(np.median(np.repeat(list(hist), list(hist.values())))) if hist else None


def summarize(backend: str, clients: int, runs: list[Run]) -> Result:
    """One row from interleaved runs: totals over their summed time, percentiles over all."""
    reqs = [r for run in runs for r in run.requests]
    seconds = sum(run.seconds for run in runs)
    ttft = np.array([r.first - r.sent for r in reqs if r.first is not None] or [0.0]) * 1e3
    gaps = np.concatenate([np.diff(r.times) for r in reqs if len(r.times) > 1] or [[0.0]]) * 1e3
    steps = sum((run.steps for run in runs), Counter())
    sizes = np.repeat(list(steps), list(steps.values())) if steps else np.zeros(1)
    server_ttft = histogram_median(sum((run.ttft_ms for run in runs), Counter()))
    return Result(
        backend=backend,
        clients=clients,
        seconds=seconds,
        requests=len(reqs),
        requests_per_s=len(reqs) / seconds,
        tokens_per_s=sum(r.tokens for r in reqs) / seconds,
        ttft_p50_ms=float(np.percentile(ttft, 50)),
        ttft_p99_ms=float(np.percentile(ttft, 99)),
        token_p50_ms=float(np.percentile(gaps, 50)),
        token_p99_ms=float(np.percentile(gaps, 99)),
        batch_p50=float(np.percentile(sizes, 50)),
        batch_max=int(sizes.max()),
        server_ttft_p50_ms=server_ttft,
    )


def bench_serve(
    checkpoint,
    backends: list[str],
    clients: int = 16,
    duration: float = 20.0,
    max_tokens: int = 64,
    prompt: str = "\n",
    temperature: float = SampleConfig.temperature,  # `polygpt sample`'s
    device: str = "cpu",
    rounds: int = 4,
    n: int = 1,
    url: str | None = None,
    precision: str | None = None,
    stagger: bool = False,
    log=print,
) -> list[Result]:
    """One client at a time and `clients` at once, per backend, alternating in `rounds`
    rounds of duration / rounds seconds each (so a change in the machine's load hits both).
    `n`: choices per request (the server's rows: clients x n). `url`: measure the server
    running there instead (one row, named "url"). `precision`: the servers' (default: the
    checkpoint's own). `stagger`: see `run_clients`."""
    if url is not None:
        backends = ["url"]
    else:
        checkpoints.read(checkpoint)  # a bad path fails here, not in a subprocess
    body = {"prompt": prompt, "max_tokens": max_tokens}
    if url is None:  # another server may read `model` as a model to load
        body["model"] = "bench"
    if n > 1:
        body["n"] = n
    body["temperature"] = temperature
    out = []
    for backend in backends:
        if url is not None:
            server = ExternalServer(url)
        else:
            rows = str(max(clients * n, 1))
            extra = ("-p", precision) if precision else ()
            server = ServerProcess(checkpoint, backend, "-d", device, "--max-batch", rows, *extra)
        try:
            run_clients(server, clients, 1.0, body, seed=10**6)  # warm up every batch size
            runs: dict[int, list[Run]] = {n: [] for n in dict.fromkeys([1, clients])}
            for i in range(rounds):
                for n, done in runs.items():
                    seconds, seed = duration / rounds, 10**7 * i
                    done.append(run_clients(server, n, seconds, body, seed, stagger))
            for n, done in runs.items():
                out.append(summarize(backend, n, done))
                log(format_row(out[-1]))
        finally:
            server.close()
    return out


HEADER = (
    f"{'backend':<7} {'clients':>7} {'req/s':>7} {'tokens/s':>9} {'TTFT p50':>9} {'p99':>7} "
    f"{'server':>7} {'token p50':>10} {'p99':>7} {'batch p50':>9} {'max':>4}"
)


def format_row(r: Result) -> str:
    server = "-" if r.server_ttft_p50_ms is None else f"{r.server_ttft_p50_ms:.1f}ms"
    return (
        f"{r.backend:<7} {r.clients:>7} {r.requests_per_s:>7.2f} {r.tokens_per_s:>9,.0f} "
        f"{r.ttft_p50_ms:>7.1f}ms {r.ttft_p99_ms:>5.0f}ms {server:>7} {r.token_p50_ms:>8.2f}ms "
        f"{r.token_p99_ms:>5.1f}ms {r.batch_p50:>9.0f} {r.batch_max:>4}"
    )


def speedups(results: list[Result]) -> list[str]:
    """Per backend: N clients' tokens/s over one's, and how much later their first token comes
    (at the clients, and at the server where it says)."""
    lines = []
    for b in dict.fromkeys(r.backend for r in results):
        rs = {r.clients: r for r in results if r.backend == b}
        if 1 in rs and len(rs) > 1:
            n = max(rs)
            x = rs[n].tokens_per_s / rs[1].tokens_per_s
            ttft = rs[n].ttft_p50_ms / rs[1].ttft_p50_ms
            line = (f"{b}: {n} concurrent clients get {x:.1f}x the tokens/s of one at a time; "
                    f"their first token comes {ttft:.1f}x later")  # fmt: skip
            s1, sn = rs[1].server_ttft_p50_ms, rs[n].server_ttft_p50_ms
            if s1 and sn:
                line += f" ({sn / s1:.1f}x at the server)"
            lines.append(line)
    return lines


def to_json(results: list[Result]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
