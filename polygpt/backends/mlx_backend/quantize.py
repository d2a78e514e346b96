"""Quantization in MLX: polygpt's shared affine format is MLX's own, so this is thin.

`mlx.nn.quantize` swaps Linear and Embedding layers for QuantizedLinear / QuantizedEmbedding,
whose parameters (`weight` packed uint32, `scales`, `biases`) are exactly the tensors of a
quantized polygpt checkpoint (see quantized.Quantization); saving the quantized model's flattened
parameters writes the format, loading one back is `nn.quantize` with the file's layers then
`load_weights`. The twin of backends/torch_backend/quantize.py, which reproduces these bytes.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def affine_quantize(w: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """(out, in) float -> packed uint32 (out, in*bits/32), scales and biases (out, in/group)."""
    return mx.quantize(w, group_size=group_size, bits=bits, mode="affine")


def affine_dequantize(
    packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
) -> mx.array:
    return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits, mode="affine")


def quantize_layers(model: nn.Module, bits: int, group_size: int, weight_names: set[str]) -> None:
    """Quantize, in place, exactly the layers whose `<path>.weight` is in weight_names."""
    nn.quantize(
        model,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda path, m: (
            hasattr(m, "to_quantized") and f"{path}.weight" in weight_names
        ),
    )


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter array in memory (packed weights, scales and biases included)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
