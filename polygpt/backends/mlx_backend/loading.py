"""Loading a checkpoint into MLX without a second copy of its weights.

`mx.load` is lazy: it reads nothing until an array is evaluated, and then only that array. So
the model is filled one tensor at a time — cast to the compute precision, quantized with
`mx.quantize` (what nn.quantize does to a layer), or dequantized — evaluated, and the file's
array dropped before the next is read. A large tensor that changes dtype (GPT-2's token
embedding at fp32) is read a chunk of rows at a time instead (tensorfile.TensorFile), since
mx.load reads a tensor whole. The largest tensor goes first, while nothing else is loaded, and
the allocator's cache is released after it; so a load holds the model plus a few MB, never the
file's weights in full beside the model's. The model's own random init is lazy too, and is
never evaluated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx

import polygpt.backends.mlx_backend.quantize as quantize
from polygpt import quantized, tensorfile
from polygpt.backends.mlx_backend.model import GPT
from polygpt.spec import ModelSpec

CHUNK_BYTES = 16 << 20  # file bytes read per step while casting or quantizing a large tensor
FILE_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


def load_gpt(
    spec: ModelSpec,
    path: Path,
    dtype: mx.Dtype | None,
    bits: int | None = None,
    file_quant: quantized.Quantization | None = None,
) -> GPT:
    """The checkpoint at `path` (already checked against `spec`; `file_quant` its declared
    quantization) as a GPT: float weights in `dtype` (None: as stored), and with `bits`, its
    quantizable layers in that many bits — the file's own packed weights when it holds them at
    those bits, else quantized here from the float weights."""
    arrays = mx.load(str(path))  # lazy: straight from safetensors, keeps bf16, no NumPy
    model = GPT(spec)
    layers: set[str] = set()
    group = 0
    if bits is not None:
        if file_quant is not None and file_quant.bits == bits:
            group = file_quant.group_size
            layers = {n for n, a in arrays.items() if a.dtype == mx.uint32}
        else:
            group = quantized.default_group_size(spec)
            layers = set(quantized.quantizable(spec, group))
        quantize.quantize_layers(model, bits, group, layers)  # on the lazy init: nothing runs
    params = {}
    names = sorted(spec.param_shapes(), key=lambda n: -arrays[n].nbytes)  # biggest first
    with tensorfile.TensorFile(path) as f:
        for i, name in enumerate(names):
            src = arrays.pop(name)
            changes = name in layers or (dtype is not None and src.dtype != dtype)
            if changes and src.dtype != mx.uint32 and src.nbytes > CHUNK_BYTES:
                # mx.load reads a tensor whole: read this one a chunk of rows at a time
                del src
                parts = []
                for chunk in _rows(f, name):
                    parts.append(_convert(name, chunk, dtype, bits, group, name in layers))
                    mx.eval(list(parts[-1].values()))
                out = {k: mx.concatenate([part[k] for part in parts]) for k in parts[0]}
                mx.eval(list(out.values()))
                del parts
            else:
                out = _convert(name, src, dtype, bits, group, name in layers, file_quant, arrays)
                mx.eval(list(out.values()))  # reads this tensor only; then its array is dropped
                del src
            params.update(out)
            if i == 0:
                mx.clear_cache()  # the largest tensor's buffers go back to the system
    model.load_weights(list(params.items()), strict=True)
    mx.clear_cache()
    return model


def _rows(f: tensorfile.TensorFile, name: str) -> Iterator[mx.array]:
    """Float tensor `name` of the file as arrays of CHUNK_BYTES of rows, read with plain reads
    (the raw bytes, viewed as the file's dtype: bf16 stays exact)."""
    e = f.entries[name]
    for a, b in tensorfile.row_chunks(e, CHUNK_BYTES):
        buf = bytearray((b - a) * e.row_bytes)
        f.read_rows(name, buf, a, b)
        yield mx.array(memoryview(buf)).view(FILE_DTYPES[e.dtype]).reshape(b - a, *e.shape[1:])


def _convert(name, src, dtype, bits, group, quantized, file_quant=None, arrays=None) -> dict:
    """The model's tensors for file tensor `name` (or a chunk of its rows), lazily computed;
    a packed weight takes its scales and biases out of `arrays`."""
    prefix = name[: -len("weight")]
    if src.dtype == mx.uint32:  # a packed weight of a quantized file
        scales, biases = arrays.pop(prefix + "scales"), arrays.pop(prefix + "biases")
        if quantized:  # kept as stored: the model computes at the file's bits
            return {name: src, prefix + "scales": scales, prefix + "biases": biases}
        w = quantize.affine_dequantize(src, scales, biases, file_quant.bits, file_quant.group_size)
        return {name: w.astype(dtype)}
    if quantized:  # row by row, so a chunk of rows quantizes as the whole would
        w, scales, biases = quantize.affine_quantize(src.astype(mx.float32), bits, group)
        return {name: w, prefix + "scales": scales, prefix + "biases": biases}
    return {name: src if dtype is None else src.astype(dtype)}
