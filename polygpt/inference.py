"""A loaded language model: checkpoint + backend + tokenizer, for sampling and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polygpt import tokenizer as tok
from polygpt import weights
from polygpt.backends import available_backends, get_backend, known_backends
from polygpt.errors import PolygptError
from polygpt.generate import GenerationConfig, generate
from polygpt.spec import ModelSpec


@dataclass
class LanguageModel:
    backend: Any
    model: Any
    spec: ModelSpec
    tokenizer: Any
    checkpoint: weights.Checkpoint
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

    def generate(
        self,
        prompts: list[str],
        cfg: GenerationConfig,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        """New text per prompt; `on_text(row, text)` streams it as it becomes final."""
        ids = [self.encode(p) for p in prompts]
        out = generate(
            self.backend,
            self.model,
            self.spec.block_size,
            ids,
            cfg,
            decode_text=self.tokenizer.decode,
            on_text=on_text,
        )
        texts = [self.tokenizer.decode(o) for o in out]
        if cfg.stop:  # a BPE token may straddle the stop string: cut the text exactly
            texts = [t[: min([t.find(s) for s in cfg.stop if s in t] or [len(t)])] for t in texts]
        return texts


def default_backend(ckpt: weights.Checkpoint | None = None) -> str:
    avail = available_backends()
    if not avail:
        raise PolygptError("neither torch nor mlx is installed: pip install 'polygpt[torch]'")
    trained = ckpt.config.get("backend") if ckpt else None
    return trained if trained in avail else avail[0]


def load(
    path: str | Path, backend: str | None = None, device: str = "auto", precision: str | None = None
) -> LanguageModel:
    """Load a checkpoint for inference. precision None: the checkpoint's own where the backend
    computes at it (see quantize.resolve_precision), else fp32/fp16/bf16/int8/int4."""
    from polygpt.quantize import resolve_precision

    ckpt = weights.read_checkpoint(path)
    be = get_backend(backend or default_backend(ckpt), device)
    precision = resolve_precision(precision, ckpt, be.name)
    model = be.load_model(ckpt.spec, ckpt.model_file, precision)
    return LanguageModel(be, model, ckpt.spec, tok.from_dict(ckpt.tokenizer), ckpt, precision)


def checkpoint_info_lines(path: str | Path) -> list[str]:
    ckpt = weights.read_checkpoint(path)
    s, cfg = ckpt.spec, ckpt.config
    dtype = weights.check_model_file(ckpt.model_file, s)
    lines = [
        f"checkpoint  {ckpt.path}",
        f"spec        vocab {s.vocab_size}, block {s.block_size}, {s.n_layer} layers, "
        f"{s.n_head} heads, {s.n_embd} embd, bias={str(s.bias).lower()}, "
        f"dropout {s.dropout}, {s.activation}",
        f"parameters  {s.num_params():,} non-embedding, {s.num_params(False):,} total",
        f"flops       {s.flops_per_token(training=False):,}/token forward at full context",
        f"weights     {dtype}, trained with {cfg.get('backend', '?')} on {cfg.get('device', '?')}",
        f"step        {ckpt.step}",
    ]
    m = cfg.get("metrics") or {}
    if m:
        parts = [f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, (int, float))]
        lines.append(f"metrics     {', '.join(parts)}")
    from polygpt.evaluate import recorded_lines  # full-split perplexity from `eval --save`

    lines.extend(recorded_lines(cfg))
    files = weights.dir_size(ckpt.path)
    lines.append("files       " + ", ".join(f"{n} {b / 1e6:.2f} MB" for n, b in files.items()))
    return lines


def environment_lines() -> list[str]:
    lines = []
    avail = set(available_backends())
    for name in known_backends():
        if name not in avail:
            lines.append(f"{name:<6}  not installed (pip install 'polygpt[{name}]')")
            continue
        try:
            d = get_backend(name, "auto").describe()
        except PolygptError as e:
            lines.append(f"{name:<6}  unavailable: {e}")
            continue
        lines.append(
            f"{name:<6}  {d['framework']}, device {d['device']} ({d['device_name']}), "
            f"BLAS: {d['blas']}, threads {d['threads']}"
        )
    return lines
