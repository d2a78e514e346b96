"""mlx.launch's group (`mx.distributed`) for polygpt.distributed.

`mx.distributed.init` reads the launcher's environment: the ring backend (MLX_RANK +
MLX_HOSTFILE, any machine, TCP), MPI (under mpirun, where MLX finds libmpi), JACCL (RDMA over
Thunderbolt 5 on Macs) and NCCL (CUDA) where MLX has them. Gradients are averaged with
`mlx.nn.average_gradients` inside the compiled train step, before clipping; the start weights
are rank 0's (an all_sum of rank 0's parameters and zeros, which is exact).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from polygpt import blas
from polygpt.errors import PolygptError

BACKENDS = ("ring", "mpi", "jaccl", "nccl")


def _launched_backend() -> str:
    """The backend mlx.launch (or mpirun) set this process up for, from its environment."""
    env = os.environ
    if "MLX_JACCL_COORDINATOR" in env or "MLX_IBV_DEVICES" in env:
        return "jaccl"
    if "NCCL_HOST_IP" in env and "MLX_WORLD_SIZE" in env:
        return "nccl"
    if "MLX_RANK" in env:
        return "ring"
    return "mpi"


class Comm:
    engine = "mx.distributed"

    def __init__(self, backend, train_cfg, timeout: float):
        self.backend = _launched_backend()
        hostfile = os.environ.get("MLX_HOSTFILE")
        single = False
        if self.backend == "ring" and hostfile:
            try:
                with open(hostfile) as f:
                    single = not f.read().strip()  # `mlx.launch -n 1` writes an empty one
            except OSError:
                pass
        if single:  # MLX cannot parse that file: a world of one needs no group anyway
            self.group, self.rank, self.size, self.local_rank = None, 0, 1, 0
            return
        if not mx.distributed.is_available(self.backend):
            raise PolygptError(
                f"this MLX build has no {self.backend} distributed backend (see polygpt "
                "info): launch with mlx.launch --backend ring"
            )
        try:
            self.group = mx.distributed.init(strict=True, backend=self.backend)
        except RuntimeError as e:
            msg = (str(e).strip().splitlines() or [repr(e)])[0][:200]
            what = f"mlx.launch's {self.backend} group"
            raise PolygptError(f"could not join {what}: {msg}") from None
        self.rank = self.group.rank()
        self.size = self.group.size()
        self.local_rank = self.rank
        threads = int(getattr(train_cfg, "threads", 0) or 0)
        user_chose = any(os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"))
        if backend.device == "cpu" and self.size > 1 and (threads or not user_chose):
            blas.set_openblas_threads(threads or 1)  # one BLAS thread per process on CPU

    def prepare(self, backend, model, opt) -> None:
        g = self.group
        # rank 0's weights everywhere: x + 0 is exact
        params = tree_map(
            lambda p: mx.distributed.all_sum(p if self.rank == 0 else mx.zeros_like(p), group=g),
            model.parameters(),
        )
        model.update(params)
        mx.eval(model.parameters())

        def average(flat: dict) -> dict:
            # as a list: average_gradients re-nests a dict's dotted names
            return dict(zip(flat, nn.average_gradients(list(flat.values()), group=g)))

        opt.grad_average = average
        opt.compiled.clear()  # step functions traced before this would not average

    def mean(self, loss) -> float:
        return float(mx.distributed.all_sum(loss, group=self.group)) / self.size

    def barrier(self) -> None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group))

    def is_comm_error(self, e: BaseException) -> bool:
        text = str(e)
        return isinstance(e, RuntimeError) and any(f"[{b}]" in text for b in BACKENDS)

    def close(self) -> None:
        pass  # MLX groups have no teardown


def available() -> dict[str, bool]:
    return {b: bool(mx.distributed.is_available(b)) for b in BACKENDS}
