"""Training speed of N processes x 1 thread (torchrun / mlx.launch) against 1 process x N
threads, on this machine's CPU, with the same global batch: a markdown table on stdout.

    python scripts/bench_distributed.py                       # the reference config, 2 ways
    python scripts/bench_distributed.py --iters 200 --procs 2 --backends torch

Each row is one `polygpt train` run (eval_iters=1, no checkpoints) and quotes its own
"trained N iterations: X ms/iter" line, which excludes the first step and evaluations. Run it
on an idle machine: on a loaded one the numbers say more about the load than about the layout.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"trained (\d+) iterations: ([\d.]+) ms/iter, ([\d,]+) tokens/s")
MLX_LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"


def run(cmd: list[str], env: dict) -> tuple[float, float] | str:
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    m = LINE.search(res.stdout)
    if not m:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed: {tail[:120]}"
    return float(m.group(2)), float(m.group(3).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "shakespeare_char.toml"))
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--backends", default="torch,mlx")
    ap.add_argument("--data", default=None, help="data.dir override")
    args = ap.parse_args()
    n = args.procs
    py = sys.executable
    out = tempfile.mkdtemp(prefix="bench_dist_")
    common = [
        args.config,
        f"max_iters={args.iters}",
        f"eval_interval={args.iters}",
        "eval_iters=1",
        "save_checkpoints=false",
        f"log_interval={args.iters}",
        "device=cpu",
        "--overwrite",
        "-q",
    ]
    if args.data:
        common.append(f"data.dir={args.data!r}")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    base["PYTHONPATH"] = str(ROOT)
    rows = []
    load_before = os.getloadavg()[0]
    for backend in args.backends.split(","):
        train = ["-m", "polygpt", "train", *common, "--backend", backend]
        if backend == "torch":
            layouts = [
                (f"1 process x {n} threads", [py, *train, f"threads={n}"], {}),
                ("1 process x 1 thread", [py, *train, "threads=1"], {}),
                (
                    f"{n} processes x 1 thread (torchrun, gloo)",
                    [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
                    + train,
                    {},
                ),
            ]
        else:
            launch = [py, "-c", MLX_LAUNCH, "-n", str(n), "--python", py, "--"]
            layouts = [
                (f"1 process x {n} BLAS threads", [py, *train], {"OPENBLAS_NUM_THREADS": str(n)}),
                ("1 process x 1 BLAS thread", [py, *train], {"OPENBLAS_NUM_THREADS": "1"}),
                (f"{n} processes x 1 BLAS thread (mlx.launch, ring)", launch + train, {}),
            ]
        for name, cmd, extra in layouts:
            cmd += ["--out", f"{out}/{backend}-{len(rows)}"]
            r = run(cmd, {**base, **extra})
            rows.append((backend, name, r))
            print(f"{backend}: {name}: {r}", file=sys.stderr, flush=True)
    print(
        f"{Path(args.config).name}, the configured global batch, {args.iters} iterations, "
        f"CPU; 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print()
    print("| backend | layout | ms/iter | tokens/s |")
    print("|---|---|---:|---:|")
    for backend, name, r in rows:
        if isinstance(r, str):
            print(f"| {backend} | {name} | {r} | |")
        else:
            print(f"| {backend} | {name} | {r[0]:.1f} | {r[1]:,.0f} |")


if __name__ == "__main__":
    main()
