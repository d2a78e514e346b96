"""Loading a checkpoint into torch without a second copy of its weights.

The model is built on the meta device (its init weights are never allocated), then each tensor
is read from the file (weights.TensorFile: plain reads, no memory map) straight into a tensor at
the compute precision and assigned to its module. A tensor stored in another dtype is read a few
MB of rows at a time and cast into place; a quantized one is dequantized the same way; for int8
each Linear layer is quantized (quantize.dynamic_int8_linear) as soon as its weights have
arrived. So a load holds the model being built plus one Linear layer's fp32 weights (int8) or a
few MB (every other precision) — never the file's weights in full beside the model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import polygpt.backends.torch_backend.quantize as quantize
from polygpt import weights
from polygpt.backends.torch_backend.model import GPT
from polygpt.spec import ModelSpec

CHUNK_BYTES = 8 << 20  # file bytes read per step while casting or dequantizing a tensor
FILE_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U32": torch.uint32,
}


def load_gpt(
    spec: ModelSpec, path: Path, dtype: torch.dtype, device: torch.device, int8: bool = False
) -> GPT:
    """The checkpoint at `path` (already checked against `spec`) as a GPT whose float weights
    are `dtype` on `device`; int8: its Linear layers dynamically quantized (CPU)."""
    with torch.device("meta"), _SkipInit():
        model = GPT(spec)
    shapes = spec.param_shapes()
    with weights.TensorFile(path) as f:
        q = f.metadata.get("quantization")
        quant = weights.Quantization.from_json(q) if q else None
        for name, shape in shapes.items():
            t = read_tensor(f, name, shape, dtype, quant).to(device)
            module_name, leaf = name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            setattr(module, leaf, nn.Parameter(t))
            if int8 and isinstance(module, nn.Linear) and _arrived(module):
                parent, attr = module_name.rsplit(".", 1)
                setattr(model.get_submodule(parent), attr, quantize.dynamic_int8_linear(module))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor the model makes itself rather than reading: build it off the meta device
        raise RuntimeError(f"{left[0]} was not loaded from the checkpoint (still on meta)")
    return model


class _SkipInit(TorchFunctionMode):
    """Random and constant fills of parameters (nn.Linear / nn.Embedding's init) do nothing
    while a model whose weights are read next is built: on the meta device they compute
    nothing anyway, but torch's meta `normal_` imports torch._dynamo (tens of MB of RSS)."""

    FILLS = frozenset({"normal_", "uniform_", "fill_", "zero_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.FILLS:
            return args[0] if args else kwargs["tensor"]  # a Tensor method, or nn.init
        return func(*args, **(kwargs or {}))


def _arrived(linear: nn.Linear) -> bool:
    return not any(p.is_meta for p in linear.parameters(recurse=False))


def read_tensor(
    f: weights.TensorFile,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    quant: weights.Quantization | None = None,
) -> torch.Tensor:
    """Tensor `name` of the file as a new CPU tensor of `shape` in `dtype`: read in place when
    the file holds that dtype, else cast (or dequantized, for a packed uint32 weight) a chunk
    of rows at a time, so nothing but the result is ever whole."""
    e = f.entries[name]
    out = torch.empty(shape, dtype=dtype)
    if quant is not None and e.dtype == "U32":
        prefix = name[: -len("weight")]
        packed, scales, biases = (
            _read(f, prefix + part) for part in ("weight", "scales", "biases")
        )
        step = max(1, CHUNK_BYTES // (4 * shape[1]))
        for a in range(0, shape[0], step):
            b = min(shape[0], a + step)
            w = quantize.affine_dequantize(
                packed[a:b], scales[a:b], biases[a:b], quant.bits, quant.group_size
            )
            out[a:b].copy_(w)
        return out
    if FILE_DTYPES[e.dtype] == dtype:
        f.read_rows(name, _bytes(out))
        return out
    for a, b in weights.row_chunks(e, CHUNK_BYTES):
        part = torch.empty((b - a, *e.shape[1:]), dtype=FILE_DTYPES[e.dtype])
        f.read_rows(name, _bytes(part), a, b)
        out[a:b].copy_(part)
    return out


def _read(f: weights.TensorFile, name: str) -> torch.Tensor:
    e = f.entries[name]
    t = torch.empty(e.shape, dtype=FILE_DTYPES[e.dtype])
    f.read_rows(name, _bytes(t))
    return t


def _bytes(t: torch.Tensor):
    """A writable buffer over a contiguous tensor's bytes (any dtype, bf16 included)."""
    return t.view(-1).view(torch.uint8).numpy()
