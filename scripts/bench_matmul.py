"""The model's own matmuls on this machine: each kernel the backends can run, against its limits.

    .venv/bin/python scripts/bench_matmul.py [--model gpt2|gpt2-medium|CHECKPOINT]
        [--rows 1,4,16,64] [--threads 2] [--rounds 5] [--out results.json]

For each weight shape of the model (qkv, proj, fc, fc2, head) and each row count, the median
milliseconds of one product `x (rows, in) · Wᵀ` over interleaved rounds (every kernel takes its
turn in each round, so a slower moment of the machine hits all of them), the weight bytes read
per second (GB/s) and the arithmetic rate (GFLOP/s), beside this machine's read bandwidth and
fp32 GEMM peak (polygpt/bench/limits.py). Kernels:

    torch plain      F.linear on the (out, in) weight: what an unprepared model calls
    torch packed     oneDNN's packed fp32 weight (prepared.PackedLinear)
    torch bf16       oneDNN's packed bf16 weight
    torch int8       prepared.Int8Linear (oneDNN u8·s8 with per-row activations, or
                     _weight_int8pack_mm where oneDNN's int8 is missing)
    torch int4       prepared.Int4Linear (_weight_int4pack_mm_for_cpu, bf16 activations)
    mlx fp32 / int8 / int4   mx.matmul, mx.quantized_matmul (group 64), on the CPU, with
                     the OpenBLAS preload the MLX backend does (polygpt/blas.py)

Each kernel cycles through copies of its weight (STREAM_BYTES apart), so every call reads its
matrix from RAM, as a decode step does, not from the caches.

The kernel each precision uses in polygpt is what `polygpt info` prints; this table is why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import machine  # scripts/machine.py

SPECS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, block_size=1024),
}


def shapes(model: str) -> dict[str, tuple[int, int]]:
    if model in SPECS:
        C, V = SPECS[model]["n_embd"], SPECS[model]["vocab_size"]
    else:
        from polygpt import checkpoints

        spec = checkpoints.read(model).spec
        C, V = spec.n_embd, spec.vocab_size
    return {"qkv": (3 * C, C), "proj": (C, C), "fc": (4 * C, C), "fc2": (C, 4 * C), "head": (V, C)}


# A decode step reads every matrix once, from RAM: a matrix smaller than the caches, timed
# call after call, would be read from them instead. So each kernel cycles through enough
# copies of its weight to stream this many bytes between two uses of one copy.
STREAM_BYTES = 128 << 20


def _cycle(make, nbytes: int):
    """A callable that runs one of several copies (made by `make(i)`) per call, in turn."""
    fns = [make(i) for i in range(max(1, -(-STREAM_BYTES // nbytes)))]
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return run


def torch_kernels(N: int, K: int, rows: int) -> dict:
    """name -> (callable, weight bytes read) for one shape and row count."""
    import torch
    import torch.nn.functional as F

    from polygpt.backends.torch_backend import prepared, quantize

    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(1))
    xb = x.bfloat16()

    def weight(i: int) -> torch.Tensor:
        return torch.randn(N, K, generator=torch.Generator().manual_seed(i)) * 0.02

    def plain(i):
        w = weight(i)
        return lambda: F.linear(x, w)

    def packed(i, dtype=torch.float32):
        m = prepared.PackedLinear(weight(i).to(dtype), None)
        return lambda: m(xb if dtype == torch.bfloat16 else x)

    def int8(i):
        m = prepared.Int8Linear(*prepared.int8_weights(weight(i)), None)
        return lambda: m(x)

    def int4(i):
        m = prepared.Int4Linear.from_affine(*quantize.affine_quantize(weight(i), 4, 64), 64)
        return lambda: m(x)

    sizes = {"plain": 4 * N * K, "packed": 4 * N * K, "bf16": 2 * N * K}
    sizes.update(int8=N * K + 4 * N, int4=N * K // 2 + 4 * N * K // 64)
    makers = {"plain": plain, "int8": int8}
    if torch.backends.mkldnn.is_available():
        makers.update(packed=packed, bf16=lambda i: packed(i, torch.bfloat16))
    if K % 64 == 0:
        makers["int4"] = int4
    return {f"torch {k}": (_cycle(f, sizes[k]), sizes[k]) for k, f in makers.items()}


def mlx_kernels(N: int, K: int, rows: int) -> dict:
    from polygpt.backends import available_backends

    if "mlx" not in available_backends():
        return {}
    from polygpt import blas

    blas.preload_openblas()  # as the MLX backend does: MLX's CPU matmul through OpenBLAS
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    x = mx.random.normal((rows, K), key=mx.random.key(1))

    def weight(i: int):
        return mx.random.normal((N, K), key=mx.random.key(i)) * 0.02

    def fp32(i):
        w = weight(i)
        mx.eval(w)
        return lambda: mx.eval(x @ w.T)

    def quantized(i, bits):
        wq, s, b = mx.quantize(weight(i), group_size=64, bits=bits)
        mx.eval(wq, s, b)
        return lambda: mx.eval(
            mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=bits)
        )

    out = {"mlx fp32": (_cycle(fp32, 4 * N * K), 4 * N * K)}
    for bits in (8, 4) if K % 64 == 0 else ():
        nbytes = N * K * bits // 8 + 8 * N * K // 64
        out[f"mlx int{bits}"] = (_cycle(lambda i, b=bits: quantized(i, b), nbytes), nbytes)
    return out


def time_round(kernels: dict, reps: int) -> dict[str, float]:
    """One round: each kernel's median ms over `reps` calls (after one warm call)."""
    got = {}
    for name, (f, _) in kernels.items():
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        got[name] = 1e3 * statistics.median(ts)
    return got


def measure(model: str, rows_list: list[int], rounds: int, backends: list[str]) -> list[dict]:
    results = []
    for label, (N, K) in shapes(model).items():
        for rows in rows_list:
            kernels = {}
            if "torch" in backends:
                kernels.update(torch_kernels(N, K, rows))
            if "mlx" in backends:
                kernels.update(mlx_kernels(N, K, rows))
            reps = max(3, min(30, int(0.1 / max(1e-4, 4 * N * K / 20e9))))  # ~0.1 s a kernel
            per = [time_round(dict(reversed(kernels.items()) if r % 2 else kernels.items()), reps)
                   for r in range(rounds)]  # fmt: skip
            for name, (_, nbytes) in kernels.items():
                ms = statistics.median(p[name] for p in per)
                results.append(
                    dict(shape=label, out=N, inp=K, rows=rows, kernel=name, ms=ms,
                         gb_s=nbytes / ms / 1e6, gflop_s=2 * rows * N * K / ms / 1e6)
                )  # fmt: skip
            done = ", ".join(f"{r['kernel']} {r['ms']:.2f}" for r in results[-len(kernels) :])
            print(f"{label} {N}x{K} rows={rows}: {done}", flush=True)
    return results


def table(results: list[dict], limits: dict) -> str:
    kernels = list(dict.fromkeys(r["kernel"] for r in results))
    lines = [
        f"read bandwidth {limits['read_gb_s']:.1f} GB/s, fp32 GEMM {limits['matmul_gflop_s']:.0f} "
        f"GFLOP/s; cells: ms (GB/s of weights, GFLOP/s)",
        "| shape | rows | " + " | ".join(kernels) + " |",
        "|---|---|" + "---|" * len(kernels),
    ]
    by = {(r["shape"], r["rows"], r["kernel"]): r for r in results}
    for shape, rows in dict.fromkeys((r["shape"], r["rows"]) for r in results):
        cells = []
        for k in kernels:
            r = by.get((shape, rows, k))
            cells.append(f"{r['ms']:.2f} ({r['gb_s']:.0f}, {r['gflop_s']:.0f})" if r else "–")
        lines.append(f"| {shape} | {rows} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2", help="gpt2, gpt2-medium or a checkpoint")
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backends", default="torch,mlx")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    import torch

    from polygpt.backends import get_backend
    from polygpt.bench import limits

    torch.set_num_threads(a.threads)
    os.environ.setdefault("MLX_NUM_THREADS", str(a.threads))
    lim = limits.measure(a.threads)
    results = measure(a.model, [int(r) for r in a.rows.split(",")], a.rounds, a.backends.split(","))
    print(table(results, lim))
    load = os.getloadavg()
    cpu = machine.cpu_line()
    print(f"CPU: {cpu}; threads {a.threads}; load average {load[0]:.2f} after the run")
    if a.out:
        doc = dict(
            model=a.model, cpu=machine.cpu_line(), threads=a.threads, rounds=a.rounds, limits=lim,
            load_after=load[0], date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv),
            torch_kernels=get_backend("torch", "cpu").describe()["kernels"], results=results,
        )  # fmt: skip
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
