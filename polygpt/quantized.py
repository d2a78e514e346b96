"""polygpt's quantized checkpoint format (MLX's affine group quantization), which both backends
read and write: its parameters, which weights it quantizes, and the check of a stored one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from polygpt.errors import PolygptError, short_repr
from polygpt.spec import ModelSpec
from polygpt.tensorfile import FLOAT_DTYPES


@dataclass(frozen=True)
class Quantization:
    """Affine group quantization, MLX's format (`mx.quantize`, mode "affine"), which both
    backends read: each group of `group_size` consecutive inputs of a weight row is stored as
    q in [0, 2^bits) with one scale and one bias, w = scale * q + bias; q values are packed low
    bits first into little-endian uint32 words. A quantized `<prefix>.weight` (out, in) becomes

        <prefix>.weight  U32   (out, in * bits / 32)
        <prefix>.scales  float (out, in / group_size)
        <prefix>.biases  float (out, in / group_size)

    and the file's metadata holds `quantization` = this object as JSON. Biases of Linear layers
    and LayerNorm parameters stay float."""

    bits: int
    group_size: int
    mode: str = "affine"

    BITS = (4, 8)
    GROUP_SIZES = (32, 64, 128)

    def __post_init__(self) -> None:
        if self.bits not in self.BITS or self.group_size not in self.GROUP_SIZES:
            raise PolygptError(
                f"unsupported quantization: {self.bits} bits, group size {self.group_size} "
                f"(bits {self.BITS}, group sizes {self.GROUP_SIZES})"
            )
        if self.mode != "affine":
            raise PolygptError(f"unsupported quantization mode {self.mode!r} (affine)")

    @classmethod
    def from_json(cls, text: str) -> Quantization:
        try:
            d = json.loads(text)
            return cls(int(d["bits"]), int(d["group_size"]), str(d.get("mode", "affine")))
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as e:
            raise PolygptError(f"bad quantization metadata {short_repr(text)}: {e!r:.80}") from None

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    def packed_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[0], shape[1] * self.bits // 32)

    def group_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[0], shape[1] // self.group_size)


def quantizable(spec: ModelSpec, group_size: int) -> list[str]:
    """The weights a quantized checkpoint stores quantized: every 2-D one (Linear layers and
    both embeddings, as `mlx.nn.quantize` does) whose input size is a multiple of group_size."""
    return [n for n, s in spec.param_shapes().items() if len(s) == 2 and s[1] % group_size == 0]


def default_group_size(spec: ModelSpec) -> int:
    """MLX's default 64 where n_embd allows it, else 32 (every weight's input is C or 4C)."""
    for g in (64, 32):
        if spec.n_embd % g == 0:
            return g
    raise PolygptError(f"n_embd {spec.n_embd} is not a multiple of 32: cannot group-quantize")


def check_quantized(
    path: Path, tensors: dict, name: str, shape: tuple[int, ...], quant: Quantization
) -> set[str]:
    """Check the stored form of quantized weight `name` (spec shape `shape`) in a file's
    header `tensors` (name -> (dtype, shape)); returns the float dtypes of its scales and
    biases."""
    if not name.endswith(".weight") or len(shape) != 2:
        raise PolygptError(f"{path}: {name} is quantized, but only 2-D weights can be")
    if shape[1] % quant.group_size:
        raise PolygptError(
            f"{path}: {name} is quantized, but its {shape[1]} inputs are not a multiple of "
            f"group size {quant.group_size}"
        )
    got = tensors[name][1]
    if got != quant.packed_shape(shape):
        raise PolygptError(
            f"{path}: {name} has packed shape {list(got)}, expected "
            f"{list(quant.packed_shape(shape))} for {quant.bits}-bit weights of {list(shape)}"
        )
    dtypes = set()
    for key in group_names(name):
        if key not in tensors:
            raise PolygptError(f"{path}: quantized {name} has no {key!r}")
        dtype, s = tensors[key]
        if dtype not in FLOAT_DTYPES:
            raise PolygptError(f"{path}: {key} has dtype {dtype}, expected one of {FLOAT_DTYPES}")
        if s != quant.group_shape(shape):
            raise PolygptError(
                f"{path}: {key} has shape {list(s)}, expected {list(quant.group_shape(shape))}"
            )
        dtypes.add(dtype)
    return dtypes


def group_names(weight: str) -> tuple[str, str]:
    """The scales and biases stored beside quantized `<prefix>.weight`."""
    prefix = weight[: -len("weight")]
    return prefix + "scales", prefix + "biases"
