"""PyTorch implementation of the Backend protocol (see polygpt/backends/base.py).

The training step is fast on the machine it runs on (measured with scripts/bench_speed.py and
scripts/bench_train.py; docs/BENCHMARKS.md, "Training speed against nanoGPT"):

- precision (`train.dtype = auto`, `auto_dtype`): bf16 autocast (fp32 master weights, AdamW
  and loss) on a CPU with bf16 dot products, where matmuls outrun fp32's; fp32
  elsewhere, and fp32 whenever a run asks for it (then the numbers move by float rounding only).
- fused AdamW (one kernel for every tensor on CPU and CUDA) and foreach gradient clipping; the
  step returns the loss as a tensor, so nothing waits for the device until the loop logs.
- `train.compile` (off by default: it did not pay on the CPUs measured here): `torch.compile`
  (inductor) of the forward + loss, compiled at the thread count the run keeps, its kernels
  cached under the user's cache directory. On CPU it needs a C++ compiler; when compiling fails
  the step says so once (a warning) and runs eager, and so do later steps.
- CPU threads (`train.threads = 0`): a tuner starts where a quick probe says and times real
  steps at 1 thread and at torch's default, keeping the faster (threads.py); generation runs
  one thread.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import polygpt.backends.torch_backend.decode as decode
import polygpt.backends.torch_backend.loading as loading
import polygpt.backends.torch_backend.prepared as prepared
import polygpt.backends.torch_backend.quantize as quantize
from polygpt import quantized
from polygpt.backends import training_rules
from polygpt.backends.base import PRECISIONS
from polygpt.backends.slots import SlotCache, SlotOps
from polygpt.backends.torch_backend.model import GPT
from polygpt.backends.torch_backend.threads import (
    DEFAULT_THREADS,
    MULTITHREAD_GENERATION_BYTES,
    ThreadTuner,
    cpu_threads,
    make_thread_tuner,
)
from polygpt.errors import PolygptError
from polygpt.modelfile import ModelFile
from polygpt.spec import ModelSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Optimizer:
    """Everything a run's train step keeps between steps (opaque to the training loop)."""

    opt: torch.optim.AdamW
    names: dict  # parameter -> canonical name, for optimizer.safetensors
    loss_fn: Callable | None = None  # model.loss, or its torch.compile'd twin
    compiled: bool = False
    compile_ok: bool = False  # the compiled loss has run a whole step
    compile_error: str | None = None
    threads: ThreadTuner | None = None
    ddp: Any = None  # DistributedDataParallel over loss_fn, in a distributed run (distributed.py)


def _resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "gpu":  # MLX's name for "the accelerator"
        device = "cuda" if torch.cuda.is_available() else "mps"
    if device == "cuda" and not torch.cuda.is_available():
        raise PolygptError("device 'cuda' is not available to torch on this machine")
    if device == "mps" and not torch.backends.mps.is_available():
        raise PolygptError("device 'mps' is not available to torch on this machine")
    if device not in Backend.devices:
        raise PolygptError(
            f"unknown torch device {device!r} ({', '.join(Backend.devices)} or auto)"
        )
    return device


def _persistent_inductor_cache() -> None:
    """inductor caches its generated kernels in /tmp/torchinductor_<user>, which a reboot
    empties, and a cold compile costs tens of seconds where a warm one costs a few (docs/
    BENCHMARKS.md, "Figures behind the code"). Keep them under the user's cache directory
    unless TORCHINDUCTOR_CACHE_DIR says where."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "polygpt" / "torchinductor")


class Backend(SlotOps):
    name = "torch"
    devices = ("cpu", "cuda", "mps")
    precisions = ("fp32", "fp16", "bf16", "int8", "int4")  # int8/int4: CPU (prepared.py)
    train_dtypes = ("fp32", "bf16")  # bf16: autocast
    # CPU threads of prefill/decode for small models: see threads.cpu_threads
    decode_threads = 1

    def __init__(self, device: str = "auto"):
        self.device = _resolve_device(device)
        self._dev = torch.device(self.device)

    def device_precisions(self, device: str | None = None) -> tuple[str, ...]:
        # torch's int8 and int4 kernels used here (prepared.py) are the CPU's
        return self.precisions if (device or self.device) == "cpu" else ("fp32", "fp16", "bf16")

    def describe(self) -> dict[str, str]:
        if self.device == "cuda":
            dev_name = torch.cuda.get_device_name()
        elif self.device == "mps":
            dev_name = "Apple MPS"
        else:
            dev_name = platform.processor() or platform.machine()
        return {
            "backend": "torch",
            "framework": f"torch {torch.__version__}",
            "device": self.device,
            "device_name": dev_name,
            "threads": str(torch.get_num_threads()),
            "blas": torch.backends.mkldnn.is_available() and "MKL/oneDNN" or "default",
            "kernels": ", ".join(f"{p} {k}" for p, k in prepared.kernels(self.device).items()),
        }

    def kernel(self, precision: str) -> str:
        """The kernel `precision`'s matmuls run on here (prepared.kernels)."""
        return prepared.kernels(self.device).get(precision, "aten")

    # -- models ------------------------------------------------------------------------------
    def init_model(self, spec: ModelSpec, seed: int) -> GPT:
        model = GPT(spec)
        model.init_weights(torch.Generator().manual_seed(seed))  # CPU generator: same on any device
        return model.to(self._dev)

    def load_model(self, model_file: ModelFile, precision: str = "fp32") -> GPT:
        """A float or quantized model file, checked (modelfile.check), at a compute precision:
        fp32/fp16/bf16 (a quantized file dequantized: its rounded weights exactly), or int8/int4
        (CPU: prepared for torch's int8 and int4 kernels, from the file's bytes). Tensor by
        tensor, straight into the compute precision: no second copy of the weights
        (loading.py)."""
        if precision not in PRECISIONS:
            raise PolygptError(
                f"precision {precision!r} is not supported by the torch backend "
                f"({', '.join(PRECISIONS)})"
            )
        self._check_precision(precision)
        target = DTYPES.get(precision, torch.float32)
        model = loading.load_gpt(model_file.spec, model_file.path, target, self._dev, precision)
        return model.eval()

    def prepare(self, model: GPT) -> GPT:
        """The model with its inference weights prepared for this machine, in place: from here
        it is for inference only (prepared.py)."""
        return prepared.prepare(model.eval())

    def _check_precision(self, precision: str) -> None:
        if precision in ("int8", "int4") and self.device != "cpu":
            raise PolygptError(
                f"torch {precision} runs on the CPU only (not {self.device}): use --device "
                f"cpu, or fp16/bf16 here"
            )

    def set_precision(self, model: GPT, precision: str) -> GPT:
        if precision in DTYPES:
            # fp16 on an x86 CPU is correct but slow (no native fp16 matmul): allowed, and
            # the benchmarks say so
            return model.to(DTYPES[precision])
        self._check_precision(precision)
        if precision in ("int8", "int4"):
            g = quantized.default_group_size(model.spec)
            return prepared.quantize_model(model, precision, g).eval()
        raise PolygptError(f"precision {precision!r} is not supported by the torch backend")

    def save_model(self, model: GPT, path: Path, metadata: dict[str, str]) -> None:
        if getattr(model, "prepared", False):
            raise PolygptError("a model prepared for inference cannot be saved: load it again")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path), metadata=metadata)

    def save_quantized(
        self, model: GPT, path: Path, metadata: dict[str, str], bits: int, group_size: int
    ) -> None:
        """Write a float model in polygpt's quantized format (quantized.Quantization), the
        same bytes `mlx.nn.quantize` + `mx.save_safetensors` would write."""
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if any(not v.is_floating_point() for v in state.values()):
            raise PolygptError("save_quantized needs a float model (load it as fp32)")
        for name in quantized.quantizable(model.spec, group_size):
            packed, scales, biases = quantize.affine_quantize(state[name].cpu(), bits, group_size)
            prefix = name[: -len("weight")]
            state[name], state[prefix + "scales"], state[prefix + "biases"] = packed, scales, biases
        save_file(state, str(path), metadata=metadata)

    def model_bytes(self, model: GPT) -> int:
        """Bytes of the weights in memory (prepared and quantized matrices included)."""
        return quantize.model_bytes(model)

    def param_shapes(self, model: GPT) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # -- training ----------------------------------------------------------------------------
    def make_optimizer(self, model: GPT, cfg) -> Optimizer:
        """Fused AdamW, plus the run's loss function (compiled with train.compile) and, on
        CPU, the thread tuner (train.threads = 0)."""
        decayed = set(model.spec.decayed_params())
        named = list(model.named_parameters())
        groups = [
            {"params": [p for n, p in named if n in decayed], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
        ]
        # fused AdamW: one kernel for all tensors (CPU and CUDA); same math as the for-loop one
        fused = self.device in ("cpu", "cuda")
        opt = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused
        )
        state = Optimizer(opt, {p: n for n, p in named}, loss_fn=model.loss)
        if getattr(cfg, "compile", False):
            _persistent_inductor_cache()
            # shapes are fixed for a run (batch_size x block_size): no dynamic-shape guards
            state.loss_fn = torch.compile(model.loss, dynamic=False)
            state.compiled = True
        threads = int(getattr(cfg, "threads", 0) or 0)
        state.threads = make_thread_tuner(self.device, threads, compiled=state.compiled)
        return state

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self._dev)

    def _forward_backward(self, model, opt: Optimizer, batches, autocast: str) -> torch.Tensor:
        n = len(batches)
        total = None
        fn = opt.ddp or opt.loss_fn
        for i, (x, y) in enumerate(batches):
            # DDP averages the gradients across ranks in the last micro-step's backward only
            local = opt.ddp is not None and i < n - 1
            with opt.ddp.no_sync() if local else contextlib.nullcontext():
                if autocast == "bf16":
                    with torch.autocast(self._dev.type, dtype=torch.bfloat16):
                        loss = fn(self._tensor(x), self._tensor(y))
                else:  # (no autocast context to build every step)
                    loss = fn(self._tensor(x), self._tensor(y))
                (loss / n if n > 1 else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total / n if n > 1 else total

    def train_step(self, model, opt, batches, lr, grad_clip, autocast: str = "fp32"):
        if not model.training:  # (train() walks every module: not once per step)
            model.train()
        if opt.threads is not None:
            opt.threads.before()
        try:
            loss = self._forward_backward(model, opt, batches, autocast)
        except Exception as e:  # noqa: BLE001 - only until the compiled loss has worked once
            if not opt.compiled or opt.compile_ok:
                raise
            # inductor failed (no C++ compiler, an unsupported op...): say so once, go eager
            opt.compile_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            warnings.warn(
                f"torch.compile failed, training eagerly: {opt.compile_error}",
                RuntimeWarning,
                stacklevel=2,
            )
            opt.loss_fn, opt.compiled = model.loss, False
            opt.opt.zero_grad(set_to_none=True)
            loss = self._forward_backward(model, opt, batches, autocast)
        opt.compile_ok = opt.compiled
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
        for g in opt.opt.param_groups:
            g["lr"] = lr
        opt.opt.step()
        prepared.weights_changed(model)
        opt.opt.zero_grad(set_to_none=True)
        if opt.threads is not None:
            opt.threads.after()
        return loss

    def auto_dtype(self) -> str:
        # a CPU with bf16 dot products (AVX512-BF16, AMX) multiplies bf16 faster than fp32
        # (docs/BENCHMARKS.md, "Training speed against nanoGPT"); elsewhere bf16 is
        # emulated. GPUs keep fp32: not measured on this project's machines.
        native = self.device == "cpu" and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
        return "bf16" if native else "fp32"

    def eval_positions(self, dtype: str) -> int:
        if self.device != "cpu":
            return 8192  # an accelerator wants large forwards
        # on the CPU fp32 activations of one 12x64 batch stay in the L2 cache and stacking them
        # slows the forward; bf16 (half the bytes) gains a little from stacking (docs/
        # BENCHMARKS.md, "Where the time goes")
        return 2048 if dtype == "bf16" else 1024

    @torch.inference_mode()
    def eval_loss(self, model, x, y, dtype: str = "fp32") -> float:
        if model.training:
            model.eval()
        if dtype == "bf16":
            with torch.autocast(self._dev.type, dtype=torch.bfloat16):
                return float(model.loss(self._tensor(x), self._tensor(y)))
        return float(model.loss(self._tensor(x), self._tensor(y)))

    def save_optimizer(self, opt, path: Path, metadata: dict[str, str]) -> None:
        tensors, step = {}, 0
        for p, name in opt.names.items():
            st = opt.opt.state.get(p)
            if not st:
                continue
            tensors[f"exp_avg/{name}"] = st["exp_avg"].detach().float().contiguous()
            tensors[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].detach().float().contiguous()
            step = int(st["step"])
        save_file(tensors, str(path), metadata={**metadata, "step": str(step)})

    def load_optimizer(self, opt, path: Path) -> int:
        step = training_rules.optimizer_step(path)
        state = load_file(str(path), device="cpu")
        params = {name: p for p, name in opt.names.items()}
        shapes = {name: p.shape for name, p in params.items()}
        for name, m, v in training_rules.checked_moments(state, path, shapes):
            p = params[name]
            opt.opt.state[p] = {
                "step": torch.tensor(float(step), dtype=torch.float32, device=p.device),
                "exp_avg": m.to(p.device, p.dtype),
                "exp_avg_sq": v.to(p.device, p.dtype),
            }
        return step

    # -- inference ---------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, model, x) -> np.ndarray:
        model.eval()
        return model(self._tensor(x)).float().cpu().numpy()

    @torch.inference_mode()
    def target_logprobs(self, model, x, y) -> np.ndarray:
        model.eval()
        logits = model(self._tensor(x)).float()
        lp = -F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), self._tensor(y).reshape(-1), reduction="none"
        )
        return lp.view(y.shape).double().cpu().numpy()

    def _generation_threads(self, model) -> int:
        """CPU threads for prefill/decode, by model size: 1 (decode_threads) while per-op
        overhead dominates, torch's default count once streaming the weights does."""
        n = getattr(model, "_generation_threads", None)
        if n is None:
            big = self.model_bytes(model) >= MULTITHREAD_GENERATION_BYTES
            n = DEFAULT_THREADS if big else self.decode_threads
            model._generation_threads = n  # per model object: model_bytes walks every tensor
        return n

    @torch.inference_mode()
    def _new_slot_cache(self, model, max_rows: int) -> SlotCache:
        if model.training:  # (eval() walks every module: once per cache, not per step)
            model.eval()
        return decode.slot_cache(prepared.for_generation(model), max_rows)

    @torch.inference_mode()
    def _prefill(self, cache: SlotCache, plan) -> np.ndarray:
        with cpu_threads(self._generation_threads(cache.model), self.device):
            return self._logits_numpy(decode.prefill_rows(cache, plan))

    @torch.inference_mode()
    def _decode(self, cache: SlotCache, plan) -> np.ndarray:
        with cpu_threads(self._generation_threads(cache.model), self.device):
            return self._logits_numpy(decode.decode_rows(cache, plan))

    @torch.inference_mode()
    def _copy(self, cache: SlotCache, src, dst, width: int) -> None:
        decode.copy_rows(cache, src, dst, width)

    @torch.inference_mode()
    def _grow(self, cache: SlotCache, columns: int) -> None:
        decode.grow(cache, columns)

    @staticmethod
    def _logits_numpy(logits: torch.Tensor) -> np.ndarray:
        if logits.dtype != torch.float32:
            logits = logits.float()
        if logits.device.type != "cpu":
            logits = logits.cpu()
        return logits.numpy()

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        elif self.device == "mps":
            torch.mps.synchronize()
