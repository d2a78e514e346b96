"""torchrun's process group and DistributedDataParallel for polygpt.distributed.

`init_process_group` reads torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT or the
rendezvous store): gloo on CPU, nccl on CUDA with one device per LOCAL_RANK. DDP wraps a small
module whose forward is the run's loss function (eager or compiled), so the backend's train
step calls it with `no_sync` on all micro-steps but the last.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from polygpt.errors import PolygptError


class _Loss(torch.nn.Module):
    """model + the optimizer state's current loss function, as one module for DDP."""

    def __init__(self, model: torch.nn.Module, opt):
        super().__init__()
        self.model = model
        self._opt = opt  # a plain attribute: its loss_fn may change (compile fallback)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._opt.loss_fn(x, y)


class Comm:
    engine = "DDP"

    def __init__(self, backend, train_cfg, timeout: float):
        if backend.device == "mps":
            raise PolygptError(
                "torch has no distributed backend for MPS: use --device cpu under torchrun, "
                "or mlx.launch with --backend mlx on Macs"
            )
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.cuda = backend.device == "cuda"
        if self.cuda:
            if self.local_rank >= torch.cuda.device_count():
                raise PolygptError(
                    f"local rank {self.local_rank} has no GPU ({torch.cuda.device_count()} "
                    "visible): launch at most one process per GPU (--nproc_per_node)"
                )
            torch.cuda.set_device(self.local_rank)  # "cuda" now means this rank's GPU
        self.backend = "nccl" if self.cuda else "gloo"
        if self.backend == "nccl" and not dist.is_nccl_available():
            raise PolygptError("this torch build has no NCCL: use --device cpu (gloo)")
        if not dist.is_initialized():
            try:
                dist.init_process_group(
                    backend=self.backend,
                    timeout=timedelta(seconds=timeout),
                    device_id=torch.device("cuda", self.local_rank) if self.cuda else None,
                )
            except (RuntimeError, ValueError) as e:
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else repr(e)
                raise PolygptError(f"could not join torchrun's process group: {msg}") from None
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        # one intra-op thread per process on CPU unless the user chose (OMP oversubscription)
        if (
            not self.cuda
            and self.size > 1
            and not int(getattr(train_cfg, "threads", 0) or 0)
            and not os.environ.get("OMP_NUM_THREADS")
        ):
            torch.set_num_threads(1)
            os.environ["OMP_NUM_THREADS"] = "1"  # and the thread tuner leaves it there

    def prepare(self, backend, model, opt) -> None:
        # DDP broadcasts rank 0's parameters now, and all-reduces (averages) the gradients in
        # backward
        opt.ddp = DistributedDataParallel(
            _Loss(model, opt), device_ids=[self.local_rank] if self.cuda else None
        )

    def mean(self, loss) -> float:
        t = loss.detach().float().reshape(1).clone()
        dist.all_reduce(t)  # SUM: gloo has no AVG
        return float(t) / self.size

    def barrier(self) -> None:
        dist.barrier()

    def is_comm_error(self, e: BaseException) -> bool:
        if isinstance(e, getattr(dist, "DistError", ())):
            return True
        text = str(e)
        return isinstance(e, RuntimeError) and any(
            s in text for s in ("gloo", "Connection closed", "NCCL", "Timed out", "timed out")
        )

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def available() -> dict[str, bool]:
    return {
        "gloo": dist.is_available() and dist.is_gloo_available(),
        "nccl": dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available(),
        "mpi": dist.is_available() and dist.is_mpi_available(),
    }
