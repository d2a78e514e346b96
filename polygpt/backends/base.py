"""The Backend protocol and the registry of framework backends.

Like einops' `_backends.py`, a framework is imported only when its backend is asked for, so a
missing or broken torch never breaks MLX (and `polygpt --help` works with neither installed).
`available_backends()` asks `importlib.util.find_spec` and imports nothing. Both backends can
live in one process: the parity tests need that.

A backend supplies primitives only: build/load/save a model, forward, loss, one optimizer step,
row operations on a slot KV cache, log-probabilities. Workflows (training loop, LR schedule,
sampling rules, metrics, the generation engine) are written once, above this layer, and hand
tokens in as NumPy int arrays and get losses, logits or log-probs back; weights never travel
through NumPy.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from polygpt.errors import PolygptError
from polygpt.modelfile import ModelFile
from polygpt.spec import ModelSpec


@dataclass(frozen=True)
class Entry:
    """What is known of a backend without importing its framework."""

    module: str  # the package implementing it (its `distributed` module joins a launcher)
    framework: str  # the module it needs
    extra: str  # the pip extra that installs it
    launchers: tuple[str, ...]  # the launchers whose ranks run this backend
    launch: str  # how to start {n} ranks of `polygpt {args}` with it


# the one registry: every backend known to polygpt
_REGISTRY: dict[str, Entry] = {
    "torch": Entry(
        "polygpt.backends.torch_backend",
        "torch",
        "torch",
        ("torchrun",),
        "torchrun --nproc_per_node={n} -m polygpt {args} --backend torch",
    ),
    "mlx": Entry(
        "polygpt.backends.mlx_backend",
        "mlx",
        "mlx",
        ("mlx.launch", "mpirun"),
        "mlx.launch -n {n} --python PYTHON -- -m polygpt {args} --backend mlx",
    ),
}

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")


class Backend(Protocol):
    """What every backend implements. Model, optimizer and cache objects are opaque to callers.

    The framework facts are class attributes, so a caller can read them without a device
    (`backend_class(name).devices`) and never needs to compare a backend's name to a string.
    """

    name: str
    devices: tuple[str, ...]  # every device name it knows, "auto" excluded
    precisions: tuple[str, ...]  # compute precisions (load_model/set_precision) on some device
    train_dtypes: tuple[str, ...]  # what train_step's `autocast` takes
    device: str  # resolved: one of `devices`

    def device_precisions(self, device: str | None = None) -> tuple[str, ...]:
        """The precisions `device` (default: this backend's) computes at; a subset of
        `precisions` (torch's int8 is CPU-only)."""

    def describe(self) -> dict[str, str]:
        """Framework version, device name, BLAS and threads, for logs and benchmarks."""

    # -- models ------------------------------------------------------------------------------
    def init_model(self, spec: ModelSpec, seed: int) -> Any:
        """A freshly initialized fp32 model (normal(0, 0.02), scaled residual projections)."""

    def load_model(self, model_file: ModelFile, precision: str = "fp32") -> Any:
        """Load a model file, float or quantized, already checked against its spec
        (modelfile.check; a checkpoint's `model`), at the compute precision `precision` (one of
        PRECISIONS); a one-line PolygptError for a precision this backend/device cannot compute
        at."""

    def prepare(self, model: Any) -> Any:
        """The model with its inference weights prepared for this machine (packed, quantized
        for the fastest kernel here); the model is for inference only from here."""

    def kernel(self, precision: str) -> str:
        """Which kernel `precision`'s matmuls run on here (for info, bench, sample --stats)."""

    def set_precision(self, model: Any, precision: str) -> Any:
        """The model converted to compute at `precision` (the same object or a new one); a
        one-line PolygptError where this backend/device cannot."""

    def save_model(self, model: Any, path: Path, metadata: dict[str, str]) -> None:
        """Write canonical names (tied head stored once) to one safetensors file."""

    def param_shapes(self, model: Any) -> dict[str, tuple[int, ...]]:
        """The model's parameters by canonical name, in order; must equal spec.param_shapes()."""

    def save_quantized(
        self, model: Any, path: Path, metadata: dict[str, str], bits: int, group_size: int
    ) -> None:
        """Write a float model in the shared quantized format (quantized.Quantization)."""

    def model_bytes(self, model: Any) -> int:
        """Bytes the loaded weights occupy in memory, packed quantized weights included."""

    # -- training ----------------------------------------------------------------------------
    def make_optimizer(self, model: Any, train_cfg: Any) -> Any:
        """AdamW, weight decay on >=2-D tensors only (spec.decayed_params())."""

    def train_step(
        self,
        model: Any,
        opt: Any,
        batches: list[tuple[np.ndarray, np.ndarray]],
        lr: float,
        grad_clip: float,
        autocast: str = "fp32",
    ) -> Any:
        """Forward+backward over the micro-batches, clip, one AdamW step at `lr`, computing in
        `autocast` (one of train_dtypes; fp32 master weights either way). Returns the mean
        loss as a lazy scalar: `float()` it only when logging (avoids a host sync)."""

    def auto_dtype(self) -> str:
        """What `train.dtype = "auto"` computes in here: bf16 (autocast, fp32 master weights)
        where the device multiplies bf16 natively and training gains from it, else fp32."""

    def eval_positions(self, dtype: str) -> int:
        """How many positions one evaluation forward should hold to run fastest (training's
        loss estimates stack equal batches up to this many)."""

    def eval_loss(self, model: Any, x: np.ndarray, y: np.ndarray, dtype: str = "fp32") -> float:
        """Mean cross-entropy without dropout or gradients, computing in `dtype` (fp32 or bf16;
        the loss itself is reduced in fp32)."""

    def save_optimizer(self, opt: Any, path: Path, metadata: dict[str, str]) -> None:
        """AdamW moments as `exp_avg/<name>` and `exp_avg_sq/<name>`, step in metadata."""

    def load_optimizer(self, opt: Any, path: Path) -> int:
        """Restore the moments saved by either backend; returns the optimizer step."""

    # -- inference ---------------------------------------------------------------------------
    def logits(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Full-sequence logits (B, T, V) as float32, for tests and parity checks."""

    def target_logprobs(self, model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """log p(y[b, t] | x[b, :t+1]) as float64 (B, T); only these leave the framework."""

    # generation on a slot cache (backends/slots.py: SlotOps writes these once from the
    # framework calls `_new_slot_cache`, `_prefill`, `_decode`, `_copy`)
    def slot_cache(self, model: Any, max_rows: int) -> Any:
        """An empty slot cache: K/V per layer (max_rows, n_head, block_size, head_dim),
        allocated once, and a length per row (slots.SlotCache)."""

    def prefill_rows(self, cache: Any, rows: Any, tokens: Any, starts: Any = None) -> np.ndarray:
        """Right-padded token lists written at columns start.. of their rows (positions =
        columns; default start 0, a fresh window); returns the logits after each row's last
        token (n, V) float32. Also a window slide and a chunked prefill."""

    def decode_rows(self, cache: Any, rows: Any, tokens: np.ndarray) -> np.ndarray:
        """One token per row at column length[row], attending to columns <= it; returns the
        next-token logits (n, V) float32."""

    def copy_rows(self, cache: Any, src: Any, dst: Any) -> None:
        """Row dst[i] becomes a copy of row src[i]: compaction, choices sharing a prefill."""

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""


def known_backends() -> list[str]:
    return list(_REGISTRY)


def available_backends() -> list[str]:
    """Backends whose framework is installed (imports nothing)."""
    return [n for n, e in _REGISTRY.items() if importlib.util.find_spec(e.framework)]


def entry(name: str) -> Entry:
    """A backend's registry entry (imports nothing); a one-line PolygptError if unknown."""
    if name not in _REGISTRY:
        raise PolygptError(f"unknown backend {name!r} (choose from {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def launcher_backend(launcher: str) -> str:
    """The backend whose ranks `launcher` (torchrun, mlx.launch, mpirun) starts."""
    return next(n for n, e in _REGISTRY.items() if launcher in e.launchers)


def get_backend(name: str, device: str = "auto") -> Backend:
    """Import and construct a backend; a one-line PolygptError if it can't be had."""
    return backend_class(name)(device=device)


def backend_class(name: str) -> type[Backend]:
    """A backend's class, for its facts (devices, precisions, ...) without choosing a device;
    imports the framework. A one-line PolygptError if it can't be had."""
    return backend_module(name).Backend


def backend_module(name: str, part: str = "") -> Any:
    """A backend's package, or its module `part` (e.g. "distributed"); imports the framework.
    A one-line PolygptError if it can't be had."""
    e = entry(name)
    if importlib.util.find_spec(e.framework) is None:
        raise PolygptError(
            f"the {name} backend needs {e.framework}, which is not installed: "
            f"pip install 'polygpt[{e.extra}]'"
        )
    try:
        return importlib.import_module(f"{e.module}.{part}" if part else e.module)
    except ImportError as err:
        raise PolygptError(f"the {name} backend failed to import: {err}") from None
