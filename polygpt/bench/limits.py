"""This machine's ceilings, to judge benchmark rates against (`polygpt bench` prints fractions).

- Memory read bandwidth: batch-1 KV decode reads every weight once per token, so
  tokens/s <= bandwidth / weight bytes. Measured as the best of a few threaded max-reductions
  over an array far larger than the caches (NumPy's reductions release the GIL, so the
  threads run in parallel, one slice each).
- Matmul throughput: prefill is a few large matmuls, so tokens/s <= peak FLOP/s / FLOPs per
  token. Measured as NumPy's (OpenBLAS/Accelerate) float32 GEMM at the frameworks' default
  thread count; torch (MKL/oneDNN) or MLX may be a little above or below it.
Both are measured in the same (possibly loaded) conditions as the rates they are set against.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from polygpt.spec import ModelSpec


def read_bandwidth(nbytes: int = 256 << 20, threads: int = 0, repeats: int = 5) -> float:
    """Bytes per second read from RAM by `threads` threads (0: every CPU)."""
    threads = threads or os.cpu_count() or 1
    arr = np.ones(nbytes // 4, dtype=np.float32)  # written once: the pages are really there
    parts = np.array_split(arr, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(repeats + 1):  # the first pass warms the threads up
            t = time.perf_counter()
            list(ex.map(np.maximum.reduce, parts))
            best = min(best, time.perf_counter() - t)
    return arr.nbytes / best


def matmul_flops(n: int = 1536, repeats: int = 5) -> float:
    """float32 GEMM FLOP/s (2 n^3 per n x n product)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    a @ b  # warm-up: BLAS threads, page faults
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def measure(threads: int = 0) -> dict:
    """Both ceilings, as stored in bench results (GB/s, GFLOP/s)."""
    return {
        "read_gb_s": read_bandwidth(threads=threads) / 1e9,
        "matmul_gflop_s": matmul_flops() / 1e9,
        "threads": threads or os.cpu_count() or 1,
    }


def prefill_flops_per_token(spec: ModelSpec, T: int) -> float:
    """Matmul FLOPs per prompt token: 2 per weight (position table excluded; the tied head
    counted) plus causal attention, on average 2 * n_layer * T * n_embd (QK^T and AV)."""
    weights = spec.num_params(False) - spec.block_size * spec.n_embd
    return 2.0 * weights + 2.0 * spec.n_layer * T * spec.n_embd


def decode_bound(weight_bytes: float, read_gb_s: float) -> float:
    """The batch-1 decode ceiling, tokens/s: every weight read once per token."""
    return read_gb_s * 1e9 / weight_bytes if weight_bytes else float("nan")
