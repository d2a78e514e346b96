"""Quantization in PyTorch: polygpt's shared affine format and honest sizes.

The checkpoint format (see polygpt/quantize.py) is MLX's affine group quantization, so MLX
loads it natively and this module reads and writes the same bytes:
`affine_quantize` reproduces `mx.quantize` (mode "affine") on CPU and `affine_dequantize` is its
inverse, `w = scale * q + bias` per group of `group_size` consecutive inputs. Values are packed
low bits first into little-endian uint32 words; we pack and unpack through a uint8 view, which
is the same bytes and needs no uint32 arithmetic (torch's uint32 support is partial).

torch computes on these weights through prepared.py: int4 from the very same groups, int8
re-quantized per output channel (the form torch's int8 kernels take).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def affine_quantize(
    w: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> packed uint32 (out, in*bits/32), scales and biases (out, in/group).

    Same arithmetic as MLX's CPU kernel, in float32: each group stores its larger-magnitude
    edge exactly (as the bias) and spreads 2^bits - 1 steps toward the other edge."""
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"in_features {cols} is not a multiple of group_size {group_size}")
    g = w.float().reshape(rows, cols // group_size, group_size)
    n_bins = float(2**bits - 1)
    w_max, w_min = g.amax(-1), g.amin(-1)
    mask = w_min.abs() > w_max.abs()
    scale = torch.clamp((w_max - w_min) / n_bins, min=1e-7)
    scale = torch.where(mask, scale, -scale)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scale)  # round half to even, as std::rint
    nonzero = q0 != 0
    scale = torch.where(nonzero, edge / torch.where(nonzero, q0, 1.0), scale)
    bias = torch.where(nonzero, edge, torch.zeros_like(edge))
    q = torch.round((g - bias[..., None]) / scale[..., None]).clamp_(0, n_bins)
    q = q.to(torch.uint8).reshape(rows, cols)
    if bits == 4:  # two values per byte, the first in the low nibble
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    packed = q.contiguous().view(torch.uint32)  # little-endian words, low values first
    return packed, scale.to(w.dtype), bias.to(w.dtype)


def affine_dequantize(
    packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """The inverse of `affine_quantize`, in the scales' dtype: (out, in) weights."""
    rows = packed.shape[0]
    b = packed.contiguous().view(torch.uint8)  # (out, in*bits/8)
    if bits == 4:
        q = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(rows, -1)
    elif bits == 8:
        q = b
    else:
        raise ValueError("bits must be 4 or 8")
    q = q.to(scales.dtype).reshape(rows, -1, group_size)
    return (scales[..., None] * q + biases[..., None]).reshape(rows, -1)


def model_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy in memory: parameters and buffers (prepared matrices
    included), each storage counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t) if t.is_mkldnn else t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total
