"""model.safetensors: the metadata polygpt writes into it, and its check against a spec, which
yields the `ModelFile` a backend loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polygpt import __version__
from polygpt.errors import PolygptError
from polygpt.quantized import Quantization, check_quantized, group_names
from polygpt.spec import ModelSpec
from polygpt.tensorfile import FLOAT_DTYPES, read_header

_PRECISIONS = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


@dataclass(frozen=True)
class ModelFile:
    """A model file checked against its spec (see `check`): names, shapes and dtypes match it,
    float or quantized, so a backend loads it without reading its header again."""

    path: Path
    spec: ModelSpec
    dtype: str  # the float dtype ("F32", "F16", "BF16"), or "int8" / "int4" when quantized
    quantization: Quantization | None = None

    @property
    def precision(self) -> str:
        """The compute precision it stores: fp32, fp16, bf16, int8 or int4."""
        return _PRECISIONS.get(self.dtype, self.dtype)


def metadata(spec: ModelSpec, **extra: str) -> dict[str, str]:
    """safetensors metadata values must be strings, so the spec goes in as a JSON string."""
    return {"format": "polygpt", "polygpt_version": __version__, "spec": spec.to_json(), **extra}


def check(path: str | Path, spec: ModelSpec) -> ModelFile:
    """Names, shapes and dtypes of a model file against the spec, float or quantized (see
    quantized.Quantization); a one-line PolygptError for the first thing that does not fit."""
    path = Path(path)
    tensors, meta = read_header(path)
    quant = Quantization.from_json(meta["quantization"]) if meta.get("quantization") else None
    expected = spec.param_shapes()
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise PolygptError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    seen, dtypes, n_quantized = set(expected), set(), 0
    for name, shape in expected.items():
        dtype, got = tensors[name]
        if quant is not None and dtype == "U32":
            dtypes |= check_quantized(path, tensors, name, shape, quant)
            seen.update(group_names(name))
            n_quantized += 1
        else:
            _check_float(path, name, dtype, got, shape)
            dtypes.add(dtype)
    extra = [n for n in tensors if n not in seen]
    if extra:
        raise PolygptError(f"{path}: unexpected tensor {extra[0]!r} for this spec")
    if len(dtypes) > 1:
        raise PolygptError(f"{path}: mixed dtypes {sorted(dtypes)}")
    if quant is None:
        return ModelFile(path, spec, dtypes.pop())
    if not n_quantized:
        raise PolygptError(f"{path}: declares {quant.precision} but holds no quantized tensor")
    return ModelFile(path, spec, quant.precision, quant)


def _check_float(path: Path, name: str, dtype: str, got: tuple, shape: tuple) -> None:
    if dtype not in FLOAT_DTYPES:
        raise PolygptError(f"{path}: {name} has dtype {dtype}, expected one of {FLOAT_DTYPES}")
    if got != shape:
        raise PolygptError(f"{path}: {name} has shape {list(got)}, the spec says {list(shape)}")
