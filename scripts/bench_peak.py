"""Peak memory of `polygpt sample` per backend and checkpoint, against weights + bare runtime.

    .venv/bin/python scripts/bench_peak.py CKPT [CKPT ...] --runtime TINY_CKPT
        [--backends torch,mlx] [--tokens 32] [--out FILE.json]

Each command runs in its own process; its peak resident set comes from the kernel (`wait4`'s
rusage), so nothing is sampled and nothing is missed. The bare runtime is the same command on
TINY_CKPT (a model of a few parameters with the same tokenizer): the interpreter, the framework
and the tokenizer. A checkpoint's ratio is its peak / (its model file's bytes + the runtime's
peak): 1.0 would mean the weights are held once and nothing else is allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import machine  # scripts/machine.py

ROOT = Path(__file__).resolve().parents[1]


def peak_rss(args: list[str]) -> int:
    """Bytes: the peak resident set of `python -m polygpt ARGS` (Linux and macOS)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "polygpt", *args], cwd=ROOT, stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"error: polygpt {' '.join(args)} exited with {proc.returncode}")
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS


def sample_args(ckpt: str, backend: str, tokens: int) -> list[str]:
    return ["sample", ckpt, "-b", backend, "-d", "cpu", "-n", str(tokens), "-t", "0",
            "--prompt", "ROMEO:"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--runtime", required=True, help="a tiny checkpoint with the same tokenizer")
    ap.add_argument("--backends", default="torch,mlx")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    rows = []
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for backend in args.backends.split(","):
        runtime = peak_rss(sample_args(args.runtime, backend, args.tokens))
        for ckpt in args.checkpoints:
            weights = (Path(ckpt) / "model.safetensors").stat().st_size
            peak = peak_rss(sample_args(ckpt, backend, args.tokens))
            rows.append(dict(backend=backend, checkpoint=ckpt, weights_mb=weights / 1e6,
                             runtime_mb=runtime / 1e6, peak_mb=peak / 1e6,
                             ratio=peak / (weights + runtime)))  # fmt: skip
            r = rows[-1]
            print(
                f"{backend:6} {ckpt:28} weights {r['weights_mb']:7.1f} MB  runtime "
                f"{r['runtime_mb']:6.1f} MB  peak {r['peak_mb']:7.1f} MB  ratio {r['ratio']:.2f}",
                flush=True,
            )
    if args.out:
        record = {
            "command": "scripts/bench_peak.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "cpu": machine.cpu(),
            "versions": machine.versions(),
            "load_average_before": load,
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
