"""Inference weights prepared for the machine, in MLX: the checkpoint's own layout.

The twin of backends/torch_backend/prepared.py. MLX's matmul kernels take the weights as the
checkpoint stores them: float (out, in) arrays for `mx.matmul`, and the shared affine groups
for `mx.quantized_matmul` (nn.QuantizedLinear / QuantizedEmbedding, made at load: quantize.py),
so there is nothing to repack and a model is prepared as it is loaded.
"""

from __future__ import annotations

QUANTIZED = ("int8", "int4")


def kernels(precisions: tuple[str, ...]) -> dict[str, str]:
    """The kernel each precision's matmuls run on (for info, bench, sample --stats)."""
    return {p: "quantized_matmul (affine)" if p in QUANTIZED else "matmul" for p in precisions}


def prepare(model):
    """The model as it is: MLX computes on the loaded layout."""
    return model
