"""`polygpt quantize`: write a checkpoint at a lower precision that every backend loads back.

One quantized format for both frameworks (quantized.Quantization): MLX's affine group
quantization, stored as plain safetensors. MLX reads it natively (nn.quantize + load_weights)
and computes in 8 or 4 bits; torch builds its int8/int4 kernels' weights from the same bytes
(backends/torch_backend/prepared.py), with no float copy. Both backends also
write it, byte for byte the same tensors (the torch quantizer reproduces mx.quantize), so the
`--backend` of this command only says which framework does the arithmetic. Why this format and
not, say, torch's per-tensor int8: it is the one an MLX user already has (mlx-lm's checkpoints),
it covers 4 bits, group-wise scales keep int8 error below per-tensor int8's (by how much:
docs/BENCHMARKS.md, "Figures behind the code"), and its
layout is documented by one line of arithmetic (w = scale * q + bias).

fp16 / bf16 checkpoints are plain float safetensors in that dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polygpt import checkpoints, modelfile, quantized
from polygpt.backends import get_backend
from polygpt.errors import PolygptError
from polygpt.inference import default_backend

QUANT_BITS = {"int8": 8, "int4": 4}
FLOATS = ("fp32", "fp16", "bf16")


@dataclass
class QuantizeResult:
    out: Path
    precision: str
    backend: str
    group_size: int | None
    bytes_before: int  # model.safetensors of the source
    bytes_after: int


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    precision: str,
    backend: str | None = None,
    group_size: int | None = None,
    overwrite: bool = False,
) -> QuantizeResult:
    """Write `src` (a float checkpoint) at `precision` to the checkpoint directory `out`."""
    if precision not in QUANT_BITS and precision not in FLOATS:
        raise PolygptError(
            f"unknown precision {precision!r} (choose from {', '.join([*QUANT_BITS, *FLOATS])})"
        )
    src, out = Path(src), Path(out)
    ckpt = checkpoints.read(src)
    if out.resolve() == src.resolve():
        raise PolygptError("--out must be a new directory, not the source checkpoint")
    if out.exists() and not overwrite:
        raise PolygptError(f"{out} exists (use --overwrite to replace it)")
    have = ckpt.model.dtype
    if ckpt.model.quantization is not None:
        raise PolygptError(f"{src} is already {have}-quantized: quantize from a float checkpoint")
    if group_size is not None and precision not in QUANT_BITS:
        raise PolygptError("--group-size applies to int8/int4 only")
    be = get_backend(backend or default_backend(ckpt), "cpu")
    config = {k: v for k, v in ckpt.config.items() if k != "quantization"}
    config.update(precision=precision, quantized_from=str(src), quantized_with=be.name)
    if precision in QUANT_BITS:
        q = quantized.Quantization(
            QUANT_BITS[precision], group_size or quantized.default_group_size(ckpt.spec)
        )
        if not quantized.quantizable(ckpt.spec, q.group_size):
            raise PolygptError(f"no weight of this model has a multiple of {q.group_size} inputs")
        model = be.load_model(ckpt.model, "fp32")
        meta = modelfile.metadata(ckpt.spec, quantization=q.to_json())
        config["quantization"] = q.to_dict()

        def save(path: Path) -> None:
            be.save_quantized(model, path, meta, q.bits, q.group_size)
    else:
        q = None
        model = be.load_model(ckpt.model, precision)
        meta = modelfile.metadata(ckpt.spec)

        def save(path: Path) -> None:
            be.save_model(model, path, meta)

    checkpoints.write(out, config=config, tokenizer=ckpt.tokenizer, save_model=save)
    modelfile.check(out / checkpoints.MODEL_FILE, ckpt.spec)  # what we wrote loads
    return QuantizeResult(
        out=out,
        precision=precision,
        backend=be.name,
        group_size=q.group_size if q else None,
        bytes_before=ckpt.model_file.stat().st_size,
        bytes_after=(out / checkpoints.MODEL_FILE).stat().st_size,
    )
