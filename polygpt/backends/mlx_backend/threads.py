"""CPU threads for MLX: the twin of backends/torch_backend/threads.py, with nothing to tune.

MLX's CPU backend has no intra-op thread pool that meets at a barrier after every op (the
cause of torch's slow multi-threaded steps on a busy machine), so training needs no thread
tuner and generation no thread switch. Its matrix products run on the BLAS it links (on Linux
the system OpenBLAS that polygpt.blas loads), whose threads OPENBLAS_NUM_THREADS sets.
"""

from __future__ import annotations

from polygpt import blas


def describe() -> str:
    """The BLAS thread count for logs and benchmarks ("auto" when the library won't say)."""
    n = blas.openblas_threads()
    return str(n) if n else "auto"
