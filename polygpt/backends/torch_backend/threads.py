"""CPU thread counts for torch: a tuner for training, one thread for generation.

OpenMP threads that meet at a barrier after every op are a win on an idle machine and a
disaster on a busy one: when another process holds a core, each of a training step's many
barriers waits for a scheduler slice (docs/BENCHMARKS.md, "Figures behind the code"). So
`ThreadTuner` times real training steps at 1 thread and at torch's default, keeps the faster,
and checks again every RETUNE_EVERY steps. It starts where a short probe of matmuls says the
machine is now (`parallel_pays`): all threads when they are faster, so an idle machine's first
evaluation and first steps do not run on one core. Thread count changes reduction order only
(float rounding); set `train.threads` to a number (or OMP_NUM_THREADS) for bit-for-bit
repeatable runs. Generation runs one thread (`cpu_threads`).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

RETUNE_EVERY = 500  # steps between thread-count checks
PROBE_STEPS = 3  # timed steps per candidate thread count in a check (fewer if decisive)
WARMUP_STEPS = 3  # first steps (allocations, compilation) are not timed
DEFAULT_THREADS = torch.get_num_threads()  # torch's choice at import (before any tuner ran)
# A decode step reads every weight once. Below this size that is a few dozen tiny ops, and
# threads only add barrier waits (cpu_threads); above it (GPT-2 124M at fp32) the step is bound
# by memory bandwidth, which one core cannot saturate (docs/BENCHMARKS.md, "GPT-2 124M and 350M").
MULTITHREAD_GENERATION_BYTES = 64 << 20


class ThreadTuner:
    """Chooses torch's intra-op thread count for CPU training by timing real steps.

    Starts at `start` (default 1 thread: never the disaster). A check runs the candidate
    counts in turn and keeps the one with the lower median step time, PROBE_STEPS steps each,
    or after one step each when one is over twice as slow as the other (so a busy machine
    costs one slow step).
    It switches only for a gain of 10% or more, so an idle machine settles on one choice.
    Every timed step is a real training step; checks repeat every RETUNE_EVERY steps.
    """

    def __init__(self, candidates: list[int], start: int | None = None):
        self.candidates = candidates
        self.chosen = candidates[0] if start is None else start
        self.step = 0
        self.next_check = WARMUP_STEPS
        self.samples: dict[int, list[float]] = {c: [] for c in candidates}
        self.history: list[tuple[int, int]] = []  # (step, chosen threads) after each check
        self._probe: int | None = None
        self._warm: set[int] = set()
        self._t0 = 0.0
        torch.set_num_threads(self.chosen)  # evaluations before the first step use it too

    def before(self) -> None:
        self._probe = None
        if self.step >= self.next_check:
            self._probe = min(self.candidates, key=lambda c: len(self.samples[c]))
        want = self._probe or self.chosen
        if want != torch.get_num_threads():  # (someone else may have changed it meanwhile)
            torch.set_num_threads(want)
        self._t0 = time.perf_counter()

    def after(self) -> None:
        # CPU ops are synchronous, so the step's work is done when it returns
        dt = time.perf_counter() - self._t0
        self.step += 1
        if self._probe is None:
            return
        if self._probe not in self._warm:
            # a count's first step pays for its warm-up (and, compiled, its own compilation:
            # inductor specializes on the thread count), so it is not a sample
            self._warm.add(self._probe)
            return
        self.samples[self._probe].append(dt)
        if min(len(s) for s in self.samples.values()) == 0:
            return
        med = {c: float(np.median(s)) for c, s in self.samples.items()}
        best = min(med, key=med.get)
        decisive = max(med.values()) > 2 * med[best]
        if decisive or min(len(s) for s in self.samples.values()) >= PROBE_STEPS:
            if med[best] < 0.9 * med[self.chosen]:
                self.chosen = best
            self.history.append((self.step, self.chosen))
            self.samples = {c: [] for c in self.candidates}
            self.next_check = self.step + RETUNE_EVERY


def parallel_pays(n: int, rounds: int = 7) -> bool:
    """Whether `n` threads beat one on this machine right now: interleaved timings of a matmul
    of a small model's size. Another process on a core makes every barrier
    wait, and the n-thread timing shows it at once."""
    a, w = torch.randn(768, 128), torch.randn(512, 128)
    times: dict[int, list[float]] = {1: [], n: []}
    prev = torch.get_num_threads()
    try:
        for r in range(rounds + 2):
            for c in (1, n):
                torch.set_num_threads(c)
                t0 = time.perf_counter()
                for _ in range(4):
                    torch.nn.functional.linear(a, w)
                if r >= 2:  # the first rounds start the thread pool
                    times[c].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    return float(np.median(times[1])) > 1.25 * float(np.median(times[n]))


def make_thread_tuner(device: str, threads: int, compiled: bool = False) -> ThreadTuner | None:
    """A tuner for CPU training when the thread count is left to us, else None (and `threads`
    > 0 is applied as given). A compiled step gets no tuner: inductor generates its loops for
    the thread count it compiles at, so the run keeps the count the probe chose."""
    if device != "cpu":
        return None
    if threads > 0:
        torch.set_num_threads(threads)
        return None
    if os.environ.get("OMP_NUM_THREADS"):
        return None  # the user chose
    n = DEFAULT_THREADS
    if n <= 1:
        return None
    start = n if parallel_pays(n) else 1
    if compiled:
        torch.set_num_threads(start)
        return None
    return ThreadTuner([1, n], start=start)


class cpu_threads:  # noqa: N801 (a context manager used like a function)
    """Run a block with `n` intra-op CPU threads, then restore the count.

    Generation runs single-threaded on the CPU: its ops are far too small to split across
    cores, and OpenMP threads meet at a barrier after every op, so on a loaded machine a
    thread waiting for a busy core stalls every op (docs/BENCHMARKS.md, "Figures behind the
    code")."""

    def __init__(self, n: int, device: str = "cpu"):
        self.n = n if device == "cpu" else 0
        self.prev = 0

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        if self.n and self.prev != self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        if self.n and self.prev != self.n:
            torch.set_num_threads(self.prev)
