"""Quantization in PyTorch: polygpt's shared affine format, dynamic int8, honest sizes.

The checkpoint format (see polygpt/quantize.py) is MLX's affine group quantization, so MLX
loads it natively and this module reads and writes the same bytes:
`affine_quantize` reproduces `mx.quantize` (mode "affine") on CPU and `affine_dequantize` is its
inverse, `w = scale * q + bias` per group of `group_size` consecutive inputs. Values are packed
low bits first into little-endian uint32 words; we pack and unpack through a uint8 view, which
is the same bytes and needs no uint32 arithmetic (torch's uint32 support is partial).

torch cannot compute in 4 bits; a quantized checkpoint is dequantized on load (weight-only
quantization: the file's rounded weights, computed in fp32/fp16/bf16), and `int8` compute is
torch's dynamic quantization (`quantize_dynamic`, CPU only), which re-quantizes the Linear
layers per tensor at load time as the reference experiment did.
"""

from __future__ import annotations

import warnings

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


def dynamic_int8(model: nn.Module) -> nn.Module:
    """torch's dynamic int8 quantization of every nn.Linear (weights int8 per tensor,
    activations quantized on the fly); the embeddings and the tied head stay fp32."""
    with warnings.catch_warnings():  # torch 2.10+ flags its own quantized-tensor constructors
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated")
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
        # in place: a copy would hold a second fp32 model at the peak (+0.5 GB at 124M)
        return torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear}, dtype=torch.qint8, inplace=True
        )


def dynamic_int8_linear(linear: nn.Linear) -> nn.Module:
    """One Linear layer quantized exactly as `dynamic_int8` quantizes each (the same call), so
    a model can be quantized layer by layer as its weights arrive. The float layer lets go of
    its weights at once: torch's swap leaves it in a reference cycle, which would hold them
    until the next garbage collection (measured: most of the fp32 weights at the load's end)."""
    quantized = dynamic_int8(nn.Sequential(linear))[0]
    linear.weight = linear.bias = None
    return quantized


def model_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy in memory, counting the packed int8 weights of
    dynamically quantized Linear layers (which model.parameters() does not list)."""
    total = sum(t.nbytes for t in model.parameters())
    total += sum(t.nbytes for t in model.buffers())
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is None or not hasattr(packed, "_weight_bias"):
            continue
        w, bias = packed._weight_bias()
        total += w.numel() * w.element_size()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            total += w.q_per_channel_scales().nbytes + w.q_per_channel_zero_points().nbytes
        else:
            total += 8 + 8  # one float64 scale and one int64 zero point
        if bias is not None:
            total += bias.nbytes
    return total
