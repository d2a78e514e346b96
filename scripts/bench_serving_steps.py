"""Where a `polygpt serve` step's time goes under N closed-loop streaming clients.

    .venv/bin/python scripts/bench_serving_steps.py CKPT --backend torch [--clients 16]
        [--seconds 20] [--max-tokens 48] [--stagger] [--out FILE.jsonl]

Starts the server (`ServerProcess`), warms it up, then runs the clients (`run_clients`, as
`polygpt bench-serve` does) and reads `/v1/stats` before and after: the engine's and the HTTP
side's seconds per phase divided by the decode steps, the cores each process used (from
/proc: the engine process, the HTTP process, this one's client threads), and the server's time
to first token and queue time (arrival to the prefill's start) at the median. One JSON line,
printed and appended to --out. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from polygpt.bench.serving import (
    ServerProcess,
    histogram_median,
    histogram_since,
    run_clients,
)

HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (its children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def measure(a) -> dict:
    server = ServerProcess(a.checkpoint, a.backend, "-d", "cpu")
    try:
        body = {"prompt": "\n", "max_tokens": a.max_tokens}
        run_clients(server, a.clients, 3, body, stagger=a.stagger)  # traces, allocations
        before, t = server.stats(), time.time()
        pids = {"engine": server.engine_pid, "http": server.proc.pid}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()} | {"clients": sum(os.times()[:2])}
        run = run_clients(server, a.clients, a.seconds, body, stagger=a.stagger)
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()} | {"clients": sum(os.times()[:2])}
        wall = time.time() - t
        after = server.stats()
    finally:
        server.close()
    steps = after["decode_steps"] - before["decode_steps"]
    per_step = {
        k: round((v - before["seconds"].get(k, 0.0)) / steps * 1e3, 3)
        for k, v in after["seconds"].items()
    }
    tokens = sum(r.tokens for r in run.requests)
    return {
        "checkpoint": str(a.checkpoint),
        "backend": a.backend,
        "clients": a.clients,
        "stagger": a.stagger,
        "seconds": round(run.seconds, 2),
        "requests": len(run.requests),
        "tokens_per_s": round(tokens / run.seconds),
        "decode_steps": steps,
        "wall_ms_per_step": round(run.seconds / steps * 1e3, 3),
        "ms_per_step": per_step,
        "prefill_calls": after.get("prefill_calls", 0) - before.get("prefill_calls", 0),
        "server_ttft_p50_ms": histogram_median(histogram_since(before, after, "ttft_ms")),
        "server_queue_p50_ms": histogram_median(histogram_since(before, after, "queue_ms")),
        "cores": {k: round((cpu1[k] - cpu0[k]) / wall, 2) for k in cpu0},
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "load_before": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--backend", required=True)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--stagger", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()
    line = json.dumps(measure(a))
    print(line)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
