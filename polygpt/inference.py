"""A loaded language model: checkpoint + backend + tokenizer, for sampling and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polygpt import checkpoints, config
from polygpt import tokenizer as tok
from polygpt.backends import Backend, available_backends, get_backend
from polygpt.engine import Event, TextChunk
from polygpt.errors import PolygptError
from polygpt.generate import GenerationConfig, finish, stream_generate
from polygpt.modelfile import ModelFile
from polygpt.spec import ModelSpec


@dataclass
class LanguageModel:
    backend: Any
    model: Any
    spec: ModelSpec
    tokenizer: Any
    checkpoint: checkpoints.Checkpoint
    precision: str

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def sizes(self) -> dict[str, int]:
        """Honest model size: bytes of model.safetensors on disk, and of the loaded weights in
        memory (packed quantized weights included)."""
        return {
            "file_bytes": self.checkpoint.model_file.stat().st_size,
            "memory_bytes": self.backend.model_bytes(self.model),
        }

    def stream(
        self, prompts: list[str], cfg: GenerationConfig, stream_text: bool = False
    ) -> Iterator[Event]:
        """The engine's events for `prompts` (Request.tag: the prompt's index), checked and
        submitted before this returns. A prompt longer than the context is cropped to its last
        block_size tokens (as nanoGPT and llama.cpp do)."""
        ids = [self.encode(p)[-self.spec.block_size :] for p in prompts]
        return stream_generate(
            self.backend,
            self.model,
            self.spec.block_size,
            ids,
            cfg,
            decode_text=self.tokenizer.decode,
            stream_text=stream_text,
        )

    def generate(
        self,
        prompts: list[str],
        cfg: GenerationConfig,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        """New text per prompt (the engine's, cut at a stop string); `on_text(row, text)`
        streams it as it becomes final."""

        def relay(ev: Event) -> None:
            if isinstance(ev, TextChunk):
                on_text(ev.request.tag, ev.text)

        events = self.stream(prompts, cfg, stream_text=on_text is not None)
        return [f.text for f in finish(events, relay if on_text is not None else None)]


def sample_config(ckpt: checkpoints.Checkpoint) -> config.SampleConfig:
    """The [sample] section of the run that made `ckpt` (SampleConfig's defaults for keys it
    does not set, or for a checkpoint without a run config)."""
    stored = (ckpt.config.get("run") or {}).get("sample") or {}
    return config.from_dict({"sample": stored}).sample


def default_backend(ckpt: checkpoints.Checkpoint | None = None) -> str:
    avail = available_backends()
    if not avail:
        raise PolygptError("neither torch nor mlx is installed: pip install 'polygpt[torch]'")
    trained = ckpt.config.get("backend") if ckpt else None
    return trained if trained in avail else avail[0]


def resolve_precision(requested: str | None, model: ModelFile, backend: Backend) -> str:
    """The compute precision to load a model file at. Asked for: that (the backend says if it
    can't). Not asked for: the file's own, where the backend's device computes at it; else
    fp32 (a quantized file dequantized: its rounded weights, exactly)."""
    if requested not in (None, "auto"):
        return requested
    return model.precision if model.precision in backend.device_precisions() else "fp32"


def load(
    path: str | Path, backend: str | None = None, device: str = "auto", precision: str | None = None
) -> LanguageModel:
    """Load a checkpoint for inference: read and checked once (checkpoints.read), then loaded
    by the backend as checked. precision None: the checkpoint's own where the backend computes
    at it (see resolve_precision), else fp32/fp16/bf16/int8/int4."""
    ckpt = checkpoints.read(path)
    be = get_backend(backend or default_backend(ckpt), device)
    precision = resolve_precision(precision, ckpt.model, be)
    model = be.prepare(be.load_model(ckpt.model, precision))
    return LanguageModel(be, model, ckpt.spec, tok.from_dict(ckpt.tokenizer), ckpt, precision)
