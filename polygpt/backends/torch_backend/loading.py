"""Loading a checkpoint into torch without a second copy of its weights.

The model is built on the meta device (its init weights are never allocated), then each tensor
is read from the file (tensorfile.TensorFile: plain reads, no memory map) straight into a tensor at
the compute precision and assigned to its module. A tensor stored in another dtype is read a few
MB of rows at a time and cast into place; a quantized one is dequantized the same way. At int8
and int4 each matrix (the Linear layers and the tied token table) becomes its prepared module
(prepared.py) from its file bytes: int8 from a few MB of float rows at a time, int4 from the
file's own 4-bit groups. So a load holds the model being built plus a few MB — never the file's
weights in full beside the model's, nor a float copy of a quantized matrix.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import polygpt.backends.torch_backend.prepared as prepared
import polygpt.backends.torch_backend.quantize as quantize
from polygpt import quantized, tensorfile
from polygpt.backends.torch_backend.model import GPT
from polygpt.spec import ModelSpec

CHUNK_BYTES = 8 << 20  # file bytes read per step while casting or dequantizing a tensor
QUANT_CHUNK_BYTES = 1 << 20  # fp32 rows quantized at once (each makes a few temporaries)
FILE_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U32": torch.uint32,
}
WTE = "transformer.wte.weight"


def load_gpt(
    spec: ModelSpec, path: Path, dtype: torch.dtype, device: torch.device, precision: str = ""
) -> GPT:
    """The checkpoint at `path` (already checked against `spec`) as a GPT whose float weights
    are `dtype` on `device`; precision int8 / int4: its matrices quantized for torch's kernels
    (CPU), the model prepared for inference."""
    with torch.device("meta"), _SkipInit():
        model = GPT(spec)
    matrices = _matrices(model) if precision in ("int8", "int4") else {}
    with tensorfile.TensorFile(path) as f:
        q = f.metadata.get("quantization")
        quant = quantized.Quantization.from_json(q) if q else None
        for name, shape in spec.param_shapes().items():
            if name in matrices:
                continue  # built below, once the Linear's bias is in place
            t = read_tensor(f, name, shape, dtype, quant).to(device)
            module_name, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(t))
        for name, module_name in matrices.items():
            reader = _Matrix(f, name, spec.param_shapes()[name], quant)
            wte = module_name == "transformer.wte"
            bias = None if wte else model.get_submodule(module_name).bias
            built = _int8(reader, bias) if precision == "int8" else _int4(reader, bias, spec)
            prepared.swap(model, module_name, built)
    if matrices:
        model.prepared = True
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor the model makes itself rather than reading: build it off the meta device
        raise RuntimeError(f"{left[0]} was not loaded from the checkpoint (still on meta)")
    return model


def _matrices(model: GPT) -> dict[str, str]:
    """weight name -> module name of every matrix a quantized model quantizes."""
    names = {f"{n}.weight": n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {**names, WTE: "transformer.wte"}


class _Matrix:
    """One matrix of the file: float rows on demand, or its 4-bit groups as stored."""

    def __init__(self, f: tensorfile.TensorFile, name: str, shape, quant):
        self.f, self.name, self.shape = f, name, tuple(shape)
        self.quant = quant if quant is not None and f.entries[name].dtype == "U32" else None
        self.prefix = name[: -len("weight")]

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) as fp32 (dequantized from the file's groups when quantized)."""
        if self.quant is not None:
            packed, scales, biases = (
                _read(self.f, self.prefix + part, a, b) for part in ("weight", "scales", "biases")
            )
            w = quantize.affine_dequantize(
                packed, scales, biases, self.quant.bits, self.quant.group_size
            )
            return w.float()
        t = _read(self.f, self.name, a, b)
        return t if t.dtype == torch.float32 else t.float()

    def chunk(self) -> int:
        return max(1, min(CHUNK_BYTES, QUANT_CHUNK_BYTES) // (4 * self.shape[1]))

    def affine4(self, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(packed, scales, biases, group size) in MLX's 4-bit affine format: the file's own
        bytes when it holds them, else quantized a chunk of float rows at a time."""
        if self.quant is not None and self.quant.bits == 4:
            parts = (_read(self.f, self.prefix + p) for p in ("weight", "scales", "biases"))
            return (*parts, self.quant.group_size)
        rows, step, out = self.shape[0], self.chunk(), None
        for a in range(0, rows, step):
            got = quantize.affine_quantize(self.rows(a, min(a + step, rows)), 4, group_size)
            if out is None:
                out = [torch.empty(rows, t.shape[1], dtype=t.dtype) for t in got]
            for o, t in zip(out, got):
                o[a : a + len(t)] = t
        return (*out, group_size)


def _int8(m: _Matrix, bias) -> nn.Module:
    q, s = prepared.int8_rows_of(m.rows, m.shape[0], m.chunk())
    return prepared.int8_matrix(q, s, bias, table=m.name == WTE)


def _int4(m: _Matrix, bias, spec: ModelSpec) -> nn.Module:
    packed, scales, biases, g = m.affine4(quantized.default_group_size(spec))
    return prepared.int4_matrix(packed, scales, biases, g, bias, table=m.name == WTE)


class _SkipInit(TorchFunctionMode):
    """Random and constant fills of parameters (nn.Linear / nn.Embedding's init) do nothing
    while a model whose weights are read next is built: on the meta device they compute
    nothing anyway, but torch's meta `normal_` imports torch._dynamo (tens of MB of RSS)."""

    FILLS = frozenset({"normal_", "uniform_", "fill_", "zero_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.FILLS:
            return args[0] if args else kwargs["tensor"]  # a Tensor method, or nn.init
        return func(*args, **(kwargs or {}))


def read_tensor(
    f: tensorfile.TensorFile,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    quant: quantized.Quantization | None = None,
) -> torch.Tensor:
    """Tensor `name` of the file as a new CPU tensor of `shape` in `dtype`: read in place when
    the file holds that dtype, else cast (or dequantized, for a packed uint32 weight) a chunk
    of rows at a time, so nothing but the result is ever whole."""
    e = f.entries[name]
    out = torch.empty(shape, dtype=dtype)
    if quant is not None and e.dtype == "U32":
        m = _Matrix(f, name, shape, quant)
        for a in range(0, shape[0], m.chunk()):
            b = min(shape[0], a + m.chunk())
            out[a:b].copy_(m.rows(a, b))
        return out
    if FILE_DTYPES[e.dtype] == dtype:
        f.read_rows(name, _bytes(out))
        return out
    for a, b in tensorfile.row_chunks(e, CHUNK_BYTES):
        out[a:b].copy_(_read(f, name, a, b))
    return out


def _read(f: tensorfile.TensorFile, name: str, a: int = 0, b: int | None = None) -> torch.Tensor:
    """Rows [a, b) of tensor `name` as stored (all of it by default)."""
    e = f.entries[name]
    b = (e.shape[0] if e.shape else 1) if b is None else b
    shape = (b - a, *e.shape[1:]) if e.shape else ()
    t = torch.empty(shape, dtype=FILE_DTYPES[e.dtype])
    f.read_rows(name, _bytes(t), a, b)
    return t


def _bytes(t: torch.Tensor):
    """A writable buffer over a contiguous tensor's bytes (any dtype, bf16 included)."""
    return t.view(-1).view(torch.uint8).numpy()
