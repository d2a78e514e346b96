"""Data-parallel training on the launchers users already run: torchrun (PyTorch DDP) and
mlx.launch (MLX's `mx.distributed`: ring, MPI, ...). Written once; each backend package has a
small `distributed` module whose `Comm` joins its framework's group and averages the gradients,
and whose `available()` lists the framework's distributed backends.

The semantics make a run's result independent of the world size (to float rounding):

- train.batch_size is the *global* batch. Every rank draws the same global batch from the shared
  seeded NumPy stream and keeps its own contiguous slice, so the RNG state (saved in the
  checkpoint) is the one-process state.
- Gradients are averaged across ranks after the last micro-step (DDP all-reduces in that
  step's backward; `no_sync` on the others) and before clipping; every rank starts from rank 0's
  weights. So every rank applies the one-process update.
- Losses reported are global means. Rank 0 alone logs, evaluates, writes metrics.jsonl and the
  (atomic) checkpoints; the others wait at a barrier. Nothing written records the world size
  except metrics.jsonl's "start" record of each run segment, so a checkpoint resumes with any
  number of processes, in either backend.
- A process that finds a launcher's environment joins its group or fails: two copies of a
  one-process run never pass for a distributed one.
- Waits are bounded: POLYGPT_DIST_TIMEOUT seconds (default 1800, longer than an evaluation
  plus a checkpoint); a peer that dies is a one-line error on the survivors, not a hang.
- A launcher ends the survivors with SIGTERM when a peer fails, often before their own
  collective notices: each rank then prints its one `error:` line too (see `_on_sigterm`).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polygpt import checkpoints
from polygpt.backends import available_backends, backend_module, entry, launcher_backend
from polygpt.errors import PolygptError

TIMEOUT_ENV = "POLYGPT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
# added to the limit of the first training step, which compiles (MLX's graph, torch.compile) at a
# speed that depends on the machine's load, not on the peers
FIRST_STEP_ALLOWANCE_S = 300.0


def detect_launcher(env: dict | None = None) -> str | None:
    """Which launcher started this process, from the environment it sets (None: none did)."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        return "torchrun"
    if "MLX_RANK" in env:  # mlx.launch's ring, jaccl and nccl launchers
        return "mlx.launch"
    if any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return "mpirun"
    return None


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        t = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise PolygptError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if t <= 0:
        raise PolygptError(f"{TIMEOUT_ENV} must be > 0, got {raw!r}")
    return t


def check_batch(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise PolygptError(
            f"train.batch_size={batch_size} is the global batch and must be a multiple of the "
            f"{world_size} processes: set batch_size to a multiple of {world_size} or launch "
            f"a number of processes that divides {batch_size}"
        )


@dataclass
class World:
    """This process's place in the run: rank 0 of 1 when no launcher started it."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # the distributed backend: gloo, nccl, ring, mpi, ...
    launcher: str | None = None
    comm: Any = None  # the backend's communicator (None in one process)
    timeout: float = DEFAULT_TIMEOUT_S
    out: Path | None = None  # the run's checkpoint directory (for the resume hint)
    backend_name: str | None = None  # the framework backend a launcher runs
    _watchdog: _Watchdog | None = field(default=None, repr=False)
    # held while rank 0 writes a checkpoint: a SIGTERM waits for the write to finish
    saving: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _sigterm: tuple | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def label(self) -> str:
        """'rank 1/2', or 'rank 1' before the group says how many."""
        return f"rank {self.rank}/{self.size}" if self.size else f"rank {self.rank}"

    def on_disk(self) -> str:
        """What a stopped rank leaves on disk and how to go on from it, for its error line."""
        if self.out is None or self.backend_name is None:
            return "checkpoints are written whole, so resume from the last one with --resume"
        args = f"train --resume --out {shlex.quote(str(self.out))}"
        cmd = entry(self.backend_name).launch.format(n=self.size or "N", args=args)
        if not self.is_main:  # rank 0 may be mid-write: it alone reads and names the step
            return f"rank 0 writes the checkpoints, in {self.out}; resume with: {cmd}"
        try:  # whatever the disk holds, the line is said
            step = checkpoints.read(self.out).step
        except Exception:
            return f"no checkpoint was saved in {self.out} yet"
        return f"{self.out} holds the checkpoint of step {step}; resume with: {cmd}"

    def describe(self) -> str:
        if self.size == 1:
            return "1 process"
        return f"{self.size} processes ({self.comm.engine} over {self.backend}, {self.launcher})"

    def record(self) -> dict:
        """What metrics.jsonl's start record says about the segment's processes."""
        return {"world_size": self.size, "dist_backend": self.backend}

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        return log if self.is_main else (lambda s: None)

    def shard(
        self, batches: list[tuple[np.ndarray, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's contiguous slice of each global micro-batch."""
        if self.size == 1:
            return batches
        n = len(batches[0][0]) // self.size
        lo, hi = self.rank * n, (self.rank + 1) * n
        return [(x[lo:hi], y[lo:hi]) for x, y in batches]

    def prepare(self, backend, model, opt) -> None:
        """Make `model` rank 0's weights and the train step average gradients across ranks."""
        if self.comm is not None:
            with self.deadline("setting up data parallelism"):
                self.comm.prepare(backend, model, opt)

    def mean(self, loss) -> float:
        """The global mean of a per-rank mean loss (every rank must call it at the same step)."""
        if self.comm is None:
            return float(loss)
        with self.deadline("averaging the loss"):
            return self.comm.mean(loss)

    def sync(self, loss) -> float:
        """float(loss): wait for this rank's queued step (which waits for its peers)."""
        if self.comm is None:
            return float(loss)
        with self.deadline("finishing a training step"):
            return float(loss)

    def barrier(self, what: str) -> None:
        if self.comm is not None:
            with self.deadline(what):
                self.comm.barrier()

    @contextmanager
    def deadline(self, what: str, first: bool = False) -> Iterator[None]:
        """Fail instead of hanging when the block outlives the timeout (MLX's ring has no
        timeout of its own: it would wait forever on a peer that stopped but kept its socket).
        A watchdog thread checks; collectives release the GIL while they wait."""
        if self.comm is None:
            yield
            return
        if self._watchdog is None:
            self._watchdog = _Watchdog(self)
        wd = self._watchdog
        prev = wd.until, wd.what, wd.limit
        limit = self.timeout + (FIRST_STEP_ALLOWANCE_S if first else 0.0)
        wd.until, wd.what, wd.limit = time.monotonic() + limit, what, limit
        try:
            yield
        except Exception as e:
            if self.comm.is_comm_error(e):
                raise PolygptError(self._peer_error(what, e)) from None
            raise
        finally:
            wd.until, wd.what, wd.limit = prev

    @contextmanager
    def guard(self, what: str = "training") -> Iterator[None]:
        """Turn a collective's failure anywhere in the block (a peer died) into one line."""
        try:
            yield
        except Exception as e:
            if self.comm is not None and self.comm.is_comm_error(e):
                raise PolygptError(self._peer_error(what, e)) from None
            raise

    def _peer_error(self, what: str, e: BaseException) -> str:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = re.sub(r"^\[[^\]]*/[^\]]*\]\s*", "", first)[:160]  # gloo's source location
        return (
            f"{self.label()}: a peer process failed or stopped while {what} ({first}); "
            f"{self.on_disk()}"
        )

    def close(self) -> None:
        if self.comm is not None:
            self.comm.close()
            self.comm = None


class _Watchdog:
    """One daemon thread per distributed run: exits the process when an armed deadline
    passes (see World.deadline)."""

    def __init__(self, world: World):
        self.world = world
        self.until: float | None = None
        self.what = ""
        self.limit = world.timeout
        threading.Thread(target=self._run, name="polygpt-dist-watchdog", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.world.timeout / 10))
            until = self.until
            if until is not None and time.monotonic() > until:
                _timed_out(self.world, self.what, self.limit)


def _timed_out(world: World, what: str, limit: float) -> None:
    # runs on a timer thread while the main thread is stuck in a collective: say so, leave now
    sys.stderr.write(
        f"error: {world.label()}: timed out after {limit:.0f}s {what} (a peer process died "
        f"or hangs; {TIMEOUT_ENV} sets the limit); {world.on_disk()}\n"
    )
    sys.stderr.flush()
    os._exit(1)


def arrive(train_cfg) -> World:
    """This process's place before any work: World() in one process. Under a launcher, the
    run's backend must be the launcher's, and from here on the launcher's SIGTERM ends the rank
    with its one `error:` line (see `_on_sigterm`), even while the framework still imports."""
    launcher = detect_launcher()
    if launcher is None:
        return World()
    want = launcher_backend(launcher)
    if train_cfg.backend != want:
        fix = entry(train_cfg.backend).launch.format(n="N", args="train CONFIG")
        raise PolygptError(
            f"this process was started by {launcher}, which runs the {want} backend, but the "
            f"run uses --backend {train_cfg.backend}: pass --backend {want}, or launch with "
            f"`{fix}`"
        )
    rank, size = _launcher_place(launcher)
    world = World(
        rank=rank,
        size=size,
        launcher=launcher,
        timeout=timeout_s(),
        out=Path(train_cfg.out),
        backend_name=want,
    )
    _on_sigterm(world)
    return world


def join(world: World, backend, train_cfg) -> World:
    """Join the launcher's process group, if a launcher started this process (see `arrive`).

    `backend` is the constructed Backend (its device picks gloo or nccl); a world size that
    does not divide the global batch is an error."""
    if world.launcher is None:
        return world
    module = backend_module(backend.name, "distributed")
    comm = module.Comm(backend, train_cfg, world.timeout)  # joins the group
    if comm.size == 1:
        comm.close()
        world.rank, world.size = 0, 1
        return world
    world.rank, world.size, world.local_rank = comm.rank, comm.size, comm.local_rank
    world.backend, world.comm = comm.backend, comm
    try:
        check_batch(train_cfg.batch_size, world.size)
    except PolygptError:
        world.close()
        raise
    return world


def _launcher_place(launcher: str) -> tuple[int, int]:
    """(rank, world size) as the launcher's environment gives them before the group is joined
    (0: not given; mlx.launch names no world size)."""
    env = os.environ
    for rank, size in (
        ("RANK", "WORLD_SIZE"),
        ("MLX_RANK", "MLX_WORLD_SIZE"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
    ):
        if rank in env:
            return int(env[rank]), int(env.get(size, "0"))
    return 0, 0


def _on_sigterm(world: World) -> None:
    """Under a launcher, SIGTERM (torchrun's way to stop the survivors of a failed peer, or a
    cancelled job) ends the rank with its one `error:` line instead of the launcher's
    traceback alone. Python runs signal handlers only when the main thread is between bytecodes,
    and it may sit in a collective waiting for the dead peer: the C-level handler writes the
    signal number to a wakeup socket at once, and a thread reading it speaks and exits (after a
    checkpoint write in progress, so what is on disk stays whole). Installed before any work,
    so no SIGTERM finds the rank without it."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be installed from the main thread
    r, w = socket.socketpair()
    w.setblocking(False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the thread below acts
    signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)

    def wait() -> None:
        while (b := r.recv(1)) and b[0] != signal.SIGTERM:
            pass  # other signals (Ctrl-C) keep their own handlers
        with world.saving:
            sys.stderr.write(
                f"error: {world.label()}: stopped by {world.launcher} (SIGTERM: a launcher "
                "stops every rank when a peer process failed, or the job was cancelled); "
                f"{world.on_disk()}\n"
            )
            sys.stderr.flush()
            os._exit(128 + signal.SIGTERM)

    world._sigterm = (r, w)  # the sockets live as long as the process
    threading.Thread(target=wait, name="polygpt-dist-sigterm", daemon=True).start()


def environment_lines() -> list[str]:
    """`polygpt info`: the distributed backends each installed framework offers here."""
    lines = []
    for name in available_backends():
        try:
            module = backend_module(name, "distributed")
        except PolygptError as e:
            lines.append(f"{name:<6}  distributed: unavailable ({e})")
            continue
        have = module.available()
        names = ", ".join(f"{b} ({'yes' if ok else 'no'})" for b, ok in have.items())
        lines.append(f"{name:<6}  distributed ({entry(name).launchers[0]}): {names}")
    return lines
