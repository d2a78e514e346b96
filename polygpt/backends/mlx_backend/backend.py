"""MLX implementation of the Backend protocol (see polygpt/backends/base.py).

The twin of backends/torch_backend/backend.py, method for method. Three things differ inside:

- AdamW is written out here (a dozen lines) instead of `mlx.optimizers.AdamW`: torch applies
  weight decay per parameter group (spec.decayed_params() only), and its bias-correction
  scalars are computed in float64 on the host. Passing those scalars in from Python gives the
  same update as torch's fused AdamW to float32 rounding, and keeps the moments in a plain
  name -> array dict that maps 1:1 onto optimizer.safetensors (`exp_avg/<name>`, ...).
- The whole train step (forward, backward, clipping, AdamW) is one `mx.compile`d function over
  the model, the optimizer moments and MLX's RNG state; MLX is lazy, so the step returns an
  unevaluated loss and queues the work with `mx.async_eval` (no host sync until logging).
- On Linux CPU, `polygpt.blas.preload_openblas()` runs before MLX is imported (see blas.py).
"""

from __future__ import annotations

import functools
import math
import platform
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polygpt import blas

blas.preload_openblas()  # must precede the first `import mlx.core` in the process

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402

import polygpt.backends.mlx_backend.decode as decode  # noqa: E402
import polygpt.backends.mlx_backend.loading as loading  # noqa: E402
import polygpt.backends.mlx_backend.prepared as prepared  # noqa: E402
import polygpt.backends.mlx_backend.quantize as quantize  # noqa: E402
import polygpt.backends.mlx_backend.threads as threads  # noqa: E402
from polygpt import quantized  # noqa: E402
from polygpt.backends import training_rules  # noqa: E402
from polygpt.backends.base import PRECISIONS  # noqa: E402
from polygpt.backends.mlx_backend.model import GPT  # noqa: E402
from polygpt.backends.slots import SlotCache, SlotOps  # noqa: E402
from polygpt.errors import PolygptError  # noqa: E402
from polygpt.modelfile import ModelFile  # noqa: E402
from polygpt.spec import ModelSpec  # noqa: E402

DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}
QUANT_BITS = {"int8": 8, "int4": 4}
_TORCH_DEVICE_NAMES = {"cuda": "gpu", "mps": "gpu"}  # so a torch run's device resumes here


def _gpu_available() -> bool:
    metal = getattr(mx, "metal", None)
    cuda = getattr(mx, "cuda", None)
    return bool((metal and metal.is_available()) or (cuda and cuda.is_available()))


def _resolve_device(device: str) -> str:
    device = _TORCH_DEVICE_NAMES.get(device, device)
    if device == "auto":
        return "gpu" if _gpu_available() else "cpu"
    if device == "gpu" and not _gpu_available():
        raise PolygptError("device 'gpu' is not available to MLX on this machine (use cpu)")
    if device not in Backend.devices:
        raise PolygptError(f"unknown mlx device {device!r} ({', '.join(Backend.devices)} or auto)")
    return device


def _on_device(method):
    """Run a Backend method's MLX ops on the backend's device (its stream), without touching
    MLX's process-wide default device."""

    @functools.wraps(method)
    def on_device(self, *args, **kwargs):
        with mx.stream(self._mx_device):
            return method(self, *args, **kwargs)

    return on_device


@dataclass
class Optimizer:
    """AdamW state under canonical names, plus the hyper-parameters torch keeps in groups."""

    names: list[str]
    decayed: set[str]
    beta1: float
    beta2: float
    weight_decay: float
    eps: float = 1e-8
    compile: bool = True  # mx.compile the train step (same numbers, fewer kernel launches)
    step: int = 0
    # {"exp_avg": {name: m}, "exp_avg_sq": {name: v}}: a mutable tree mx.compile updates
    state: dict = field(default_factory=dict)
    compiled: dict = field(default_factory=dict)  # (n_micro, autocast, clip) -> step fn
    # a distributed run's cross-rank gradient mean (nn.average_gradients; distributed.py)
    grad_average: Callable | None = None


_EVAL_FNS: dict[int, tuple[weakref.ref, Callable]] = {}


def _compiled_loss(model: GPT) -> Callable:
    """model.loss under mx.compile, as the train step is: one fused graph per batch shape
    instead of a few hundred eager ops. The weights are inputs (model.state), so the function
    follows training's updates; traced in eval mode (no dropout), as eval_loss calls it."""
    key = id(model)
    entry = _EVAL_FNS.get(key)
    if entry is None or entry[0]() is not model:
        fn = mx.compile(model.loss, inputs=[model.state])
        ref = weakref.ref(model, lambda _, k=key, d=_EVAL_FNS: d.pop(k, None))
        entry = _EVAL_FNS[key] = (ref, fn)
    return entry[1]


class Backend(SlotOps):
    name = "mlx"
    devices = ("cpu", "gpu")
    precisions = PRECISIONS  # every one: int8/int4 computed as stored
    train_dtypes = ("fp32", "bf16")

    def __init__(self, device: str = "auto"):
        self.device = _resolve_device(device)
        # MLX's default device is process-wide: rather than change it (and every other
        # backend's in this process), each public method runs its ops on this one's stream
        self._mx_device = mx.gpu if self.device == "gpu" else mx.cpu

    def device_precisions(self, device: str | None = None) -> tuple[str, ...]:
        return self.precisions

    def describe(self) -> dict[str, str]:
        if self.device == "gpu":
            try:
                dev_name = str(mx.device_info().get("device_name", "GPU"))
            except (AttributeError, RuntimeError):
                dev_name = "GPU"
        else:
            dev_name = platform.processor() or platform.machine()
        if sys.platform == "darwin":
            blas_name = "Accelerate"
        elif sys.platform == "linux":
            blas_name = blas.blas_in_use()
        else:
            blas_name = "bundled"
        return {
            "backend": "mlx",
            "framework": f"mlx {mx.__version__}",
            "device": self.device,
            "device_name": dev_name,
            "threads": threads.describe(),
            "blas": blas_name,
            "kernels": ", ".join(
                f"{p} {k}" for p, k in prepared.kernels(self.device_precisions()).items()
            ),
        }

    def kernel(self, precision: str) -> str:
        return prepared.kernels((precision,))[precision]

    def prepare(self, model: GPT) -> GPT:
        return prepared.prepare(model)

    # -- models ------------------------------------------------------------------------------
    @_on_device
    def init_model(self, spec: ModelSpec, seed: int) -> GPT:
        model = GPT(spec)
        model.init_weights(mx.random.key(seed))
        mx.eval(model.parameters())
        return model

    @_on_device
    def load_model(self, model_file: ModelFile, precision: str = "fp32") -> GPT:
        """A float or quantized model file, checked (modelfile.check), at a compute precision:
        fp32/fp16/bf16 (a quantized file is dequantized), or int8/int4 (a float file is
        quantized as nn.quantize does; a file already quantized at those bits loads as it is).
        Tensor by tensor from the lazy mx.load: no second copy of the weights (loading.py)."""
        if precision not in PRECISIONS:
            raise PolygptError(
                f"precision {precision!r} is not supported by the mlx backend "
                f"({', '.join(PRECISIONS)})"
            )
        path, quant = model_file.path, model_file.quantization
        bits = QUANT_BITS.get(precision)
        if quant is not None and precision not in DTYPES and precision != quant.precision:
            raise PolygptError(
                f"{path} is {quant.precision}-quantized: load it as {quant.precision}, or "
                f"dequantized as fp32/fp16/bf16 (re-quantizing to {precision} would round "
                "twice)"
            )
        # int8/int4: a float file is quantized from fp32, a quantized one keeps its dtypes
        dtype = DTYPES.get(precision, None if quant is not None else mx.float32)
        model = loading.load_gpt(model_file.spec, path, dtype, bits, quant)
        model.eval()
        return model

    @_on_device
    def set_precision(self, model: GPT, precision: str) -> GPT:
        if precision in DTYPES:
            model.set_dtype(DTYPES[precision])
            mx.eval(model.parameters())
            return model
        if precision in QUANT_BITS:  # nn.quantize with the checkpoint format's layers
            group = quantized.default_group_size(model.spec)
            layers = set(quantized.quantizable(model.spec, group))
            quantize.quantize_layers(model, QUANT_BITS[precision], group, layers)
            mx.eval(model.parameters())
            return model
        raise PolygptError(f"precision {precision!r} is not supported by the mlx backend")

    def save_model(self, model: GPT, path: Path, metadata: dict[str, str]) -> None:
        mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())), metadata=metadata)

    @_on_device
    def save_quantized(
        self, model: GPT, path: Path, metadata: dict[str, str], bits: int, group_size: int
    ) -> None:
        """Write a float model in polygpt's quantized format (quantized.Quantization): quantize
        its layers in place with nn.quantize and save the flattened parameters."""
        layers = set(quantized.quantizable(model.spec, group_size))
        quantize.quantize_layers(model, bits, group_size, layers)
        self.save_model(model, path, metadata)

    def model_bytes(self, model: GPT) -> int:
        """Bytes of the weights in memory (packed weights, scales and biases when quantized)."""
        return quantize.model_bytes(model)

    def param_shapes(self, model: GPT) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}

    # -- training ----------------------------------------------------------------------------
    @_on_device
    def make_optimizer(self, model: GPT, cfg) -> Optimizer:
        params = dict(tree_flatten(model.trainable_parameters()))
        opt = Optimizer(
            names=list(params),
            decayed=set(model.spec.decayed_params()),
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            weight_decay=cfg.weight_decay,
        )
        opt.state["exp_avg"] = {n: mx.zeros_like(p) for n, p in params.items()}
        opt.state["exp_avg_sq"] = {n: mx.zeros_like(p) for n, p in params.items()}
        return opt

    def _tokens(self, a: np.ndarray) -> mx.array:
        return mx.array(np.ascontiguousarray(a, dtype=np.int32))

    def _compiled_step(self, model: GPT, opt: Optimizer, n_micro: int, autocast: str, clip: bool):
        key = (n_micro, autocast, clip)
        if key in opt.compiled:
            return opt.compiled[key]
        state = [model.state, opt.state, mx.random.state]
        decay = {n: (n in opt.decayed) for n in opt.names}
        b1, b2, eps, wd = opt.beta1, opt.beta2, opt.eps, opt.weight_decay

        def loss_fn(params, x, y):
            if autocast == "bf16":  # compute in bf16; the fp32 master weights get the grads
                params = tree_map(lambda p: p.astype(mx.bfloat16), params)
            model.update(params)
            return model.loss(x, y)

        grad_fn = mx.value_and_grad(loss_fn)

        def step(xs, ys, lr, step_size, bc2_sqrt, max_norm):
            params = model.trainable_parameters()
            total, grads = None, None
            for i in range(n_micro):  # gradient accumulation, as torch's (loss / n).backward()
                loss, g = grad_fn(params, xs[i], ys[i])
                total = loss if total is None else total + loss
                grads = g if grads is None else tree_map(mx.add, grads, g)
            flat = dict(tree_flatten(grads))
            if n_micro > 1:
                flat = {k: g / n_micro for k, g in flat.items()}
            if opt.grad_average is not None:  # before clipping, as DDP
                flat = opt.grad_average(flat)
            if clip:  # torch.nn.utils.clip_grad_norm_
                norm = mx.sqrt(sum(mx.sum(mx.square(g)) for g in flat.values()))
                coef = mx.minimum(max_norm / (norm + 1e-6), 1.0)
                flat = {k: g * coef for k, g in flat.items()}
            p_flat = dict(tree_flatten(params))
            m_all, v_all = opt.state["exp_avg"], opt.state["exp_avg_sq"]
            new = []
            for name, g in flat.items():  # torch's AdamW (decoupled decay, bias correction)
                p = p_flat[name]
                if decay[name] and wd:
                    p = p * (1 - lr * wd)
                m = m_all[name] + (1 - b1) * (g - m_all[name])  # torch: lerp(m, g, 1 - b1)
                v = b2 * v_all[name] + (1 - b2) * mx.square(g)
                m_all[name], v_all[name] = m, v
                new.append((name, p - step_size * m / (mx.sqrt(v) / bc2_sqrt + eps)))
            model.update(tree_unflatten(new))
            return total / n_micro

        if opt.compile:
            step = mx.compile(step, inputs=state, outputs=state)
        opt.compiled[key] = step
        return step

    @_on_device
    def train_step(
        self,
        model: GPT,
        opt: Optimizer,
        batches,
        lr: float,
        grad_clip: float,
        autocast: str = "fp32",
    ):
        if autocast not in self.train_dtypes:
            can = " or ".join(self.train_dtypes)
            raise PolygptError(f"mlx training dtype must be {can}, got {autocast!r}")
        model.train()
        opt.step += 1
        # torch computes these in float64 on the host; so do we, then pass float32 scalars
        step_size = lr / (1 - opt.beta1**opt.step)
        bc2_sqrt = math.sqrt(1 - opt.beta2**opt.step)
        xs = mx.stack([self._tokens(x) for x, _ in batches])  # (n_micro, B, T)
        ys = mx.stack([self._tokens(y) for _, y in batches])
        step = self._compiled_step(model, opt, len(batches), autocast, grad_clip > 0)
        f32 = lambda v: mx.array(v, dtype=mx.float32)
        loss = step(xs, ys, f32(lr), f32(step_size), f32(bc2_sqrt), f32(grad_clip))
        # queue the step without waiting: the caller float()s the loss only when logging
        mx.async_eval(loss, model.parameters(), opt.state)
        return loss

    def auto_dtype(self) -> str:
        return "fp32"  # MLX's CPU ops have no bf16 fast path to gain from

    def eval_positions(self, dtype: str) -> int:
        # on the CPU one 12x64 batch per forward ran faster than ten stacked (docs/BENCHMARKS.md)
        return 8192 if self.device == "gpu" else 1024

    @_on_device
    def eval_loss(self, model: GPT, x: np.ndarray, y: np.ndarray, dtype: str = "fp32") -> float:
        model.eval()
        x, y = self._tokens(x), self._tokens(y)
        if dtype == "bf16":  # the weights cast for this forward, then the fp32 ones back
            params = model.parameters()
            model.update(tree_map(lambda p: p.astype(mx.bfloat16), params))
            try:
                return float(model.loss(x, y))
            finally:
                model.update(params)
        return float(_compiled_loss(model)(x, y))

    def save_optimizer(self, opt: Optimizer, path: Path, metadata: dict[str, str]) -> None:
        tensors = {}
        for name in opt.names:
            tensors[f"exp_avg/{name}"] = opt.state["exp_avg"][name].astype(mx.float32)
            tensors[f"exp_avg_sq/{name}"] = opt.state["exp_avg_sq"][name].astype(mx.float32)
        mx.save_safetensors(str(path), tensors, metadata={**metadata, "step": str(opt.step)})

    @_on_device
    def load_optimizer(self, opt: Optimizer, path: Path) -> int:
        step = training_rules.optimizer_step(path)
        state = mx.load(str(path))
        shapes = {name: opt.state["exp_avg"][name].shape for name in opt.names}
        for name, m, v in training_rules.checked_moments(state, path, shapes):
            ref = opt.state["exp_avg"][name]
            # assign into the same dicts: the compiled step captured these containers
            opt.state["exp_avg"][name] = m.astype(ref.dtype)
            opt.state["exp_avg_sq"][name] = v.astype(ref.dtype)
        opt.step = step
        mx.eval(opt.state)
        return step

    # -- inference ---------------------------------------------------------------------------
    @_on_device
    def logits(self, model: GPT, x: np.ndarray) -> np.ndarray:
        model.eval()
        return np.array(model(self._tokens(x)).astype(mx.float32))

    @_on_device
    def target_logprobs(self, model: GPT, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        model.eval()
        logits = model(self._tokens(x)).astype(mx.float32)
        picked = mx.take_along_axis(logits, self._tokens(y)[..., None], axis=-1)[..., 0]
        lp = picked - mx.logsumexp(logits, axis=-1)  # (B, T)
        return np.array(lp).astype(np.float64)

    @_on_device
    def _new_slot_cache(self, model: GPT, max_rows: int) -> SlotCache:
        if model.training:
            model.eval()
        return decode.slot_cache(model, max_rows)

    @_on_device
    def _prefill(self, cache: SlotCache, plan) -> np.ndarray:
        logits = decode.prefill_rows(cache, plan).astype(mx.float32)
        mx.eval(logits, cache.keys, cache.values)
        return np.array(logits)

    @_on_device
    def _decode(self, cache: SlotCache, plan) -> np.ndarray:
        logits = decode.decode_rows(cache, plan).astype(mx.float32)
        mx.eval(logits, cache.keys, cache.values)
        return np.array(logits)

    @_on_device
    def _copy(self, cache: SlotCache, src, dst, width: int) -> None:
        decode.copy_rows(cache, src, dst, width)

    def _grow(self, cache: SlotCache, columns: int) -> None:
        decode.grow(cache, columns)

    def synchronize(self) -> None:
        mx.synchronize()
