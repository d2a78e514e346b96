"""What both backends share outside generation: the init rule and the optimizer file's checks.
A backend supplies only the framework calls (drawing the normals, building its state)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from polygpt import tensorfile
from polygpt.errors import PolygptError
from polygpt.spec import INIT_STD, ModelSpec


def init_rule(spec: ModelSpec) -> dict[str, tuple[str, float]]:
    """How each parameter starts (nanoGPT's GPT-2 init): ("normal", std) for matrices, 0.02 and
    0.02/sqrt(2·n_layer) for residual projections; ("fill", 1.0) for LayerNorm weights and
    ("fill", 0.0) for biases. The backends draw the normals from their own RNG."""
    resid = set(spec.residual_projections())
    rules = {}
    for name, shape in spec.param_shapes().items():
        if len(shape) >= 2:
            std = INIT_STD / math.sqrt(2 * spec.n_layer) if name in resid else INIT_STD
            rules[name] = ("normal", std)
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            rules[name] = ("fill", 1.0)
        else:
            rules[name] = ("fill", 0.0)
    return rules


def optimizer_step(path: Path) -> int:
    """The AdamW step an optimizer.safetensors was saved at (its metadata)."""
    _, meta = tensorfile.read_header(Path(path))
    return int(meta.get("step", 0))


def checked_moments(
    state: Mapping[str, Any], path: Path, shapes: Mapping[str, Sequence[int]]
) -> Iterator[tuple[str, Any, Any]]:
    """(name, exp_avg, exp_avg_sq) for each parameter of `shapes` from a loaded
    optimizer.safetensors (either backend's); a one-line error for a missing or misshapen one."""
    for name, shape in shapes.items():
        try:
            m, v = state[f"exp_avg/{name}"], state[f"exp_avg_sq/{name}"]
        except KeyError:
            raise PolygptError(f"{path}: no optimizer state for {name}") from None
        if tuple(m.shape) != tuple(shape) or tuple(v.shape) != tuple(shape):
            raise PolygptError(f"{path}: optimizer state for {name} has the wrong shape")
        yield name, m, v
