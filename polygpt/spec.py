"""ModelSpec: the GPT-2 architecture as plain data.

This module is the single source of truth for the architecture: canonical parameter names (the
nanoGPT / HF GPT-2 names), their shapes and order, parameter counts and FLOPs. It deliberately
imports no torch, mlx or numpy so a spec can be read, validated and printed anywhere, and both
backends build their module trees from it and must expose exactly `param_shapes()`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from polygpt.errors import PolygptError

ACTIVATIONS = ("gelu_tanh", "gelu")  # GPT-2's tanh approximation (default), exact erf (nanoGPT)
LAYER_NORM_EPS = 1e-5
INIT_STD = 0.02
MAX_LAYERS = 4096  # GPT-3 has 96


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int = 65  # 65 for shakespeare-char, 50257 for GPT-2 BPE
    block_size: int = 64  # maximum context length (learned position embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = False  # biases in Linear and LayerNorm (GPT-2: True; nanoGPT default: False)
    dropout: float = 0.0  # training only; inference never drops
    activation: str = "gelu_tanh"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PolygptError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise PolygptError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if not isinstance(self.bias, bool):
            raise PolygptError(f"model.bias must be true or false, got {self.bias!r}")
        if self.n_layer > MAX_LAYERS:  # a hostile config.json must not make param_shapes() hang
            raise PolygptError(f"model.n_layer must be at most {MAX_LAYERS}, got {self.n_layer}")
        is_number = isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
        if not (is_number and 0.0 <= self.dropout < 1.0):
            raise PolygptError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise PolygptError(
                f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    # ---- serialization -------------------------------------------------------------------

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PolygptError(f"unknown model spec key: {unknown[0]!r}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> ModelSpec:
        try:
            d = json.loads(s)
        except (ValueError, RecursionError) as e:
            raise PolygptError(f"model spec is not valid JSON: {e!r:.80}") from None
        if not isinstance(d, dict):
            raise PolygptError("model spec must be a JSON object")
        return cls.from_dict(d)

    # ---- parameters ----------------------------------------------------------------------

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical names -> shapes, in nanoGPT state_dict order. Linear weights are (out, in).

        The LM head is tied to `transformer.wte.weight` and is not listed (stored once).
        """
        C, V = self.n_embd, self.vocab_size
        shapes: dict[str, tuple[int, ...]] = {
            "transformer.wte.weight": (V, C),
            "transformer.wpe.weight": (self.block_size, C),
        }

        def linear(prefix: str, n_out: int, n_in: int) -> None:
            shapes[f"{prefix}.weight"] = (n_out, n_in)
            if self.bias:
                shapes[f"{prefix}.bias"] = (n_out,)

        def norm(prefix: str) -> None:
            shapes[f"{prefix}.weight"] = (C,)
            if self.bias:
                shapes[f"{prefix}.bias"] = (C,)

        for i in range(self.n_layer):
            p = f"transformer.h.{i}"
            norm(f"{p}.ln_1")
            linear(f"{p}.attn.c_attn", 3 * C, C)
            linear(f"{p}.attn.c_proj", C, C)
            norm(f"{p}.ln_2")
            linear(f"{p}.mlp.c_fc", 4 * C, C)
            linear(f"{p}.mlp.c_proj", C, 4 * C)
        norm("transformer.ln_f")
        return shapes

    def residual_projections(self) -> list[str]:
        """Weights initialized with std 0.02/sqrt(2*n_layer) (GPT-2 paper, as nanoGPT)."""
        return [
            name
            for name in self.param_shapes()
            if name.endswith("c_proj.weight")  # attn.c_proj and mlp.c_proj
        ]

    def decayed_params(self) -> list[str]:
        """AdamW weight decay applies to tensors of 2 or more dims (matmuls, embeddings)."""
        return [n for n, s in self.param_shapes().items() if len(s) >= 2]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; nanoGPT's convention subtracts the position embeddings only
        (token embeddings stay counted because they are the tied LM head)."""
        total = sum(_prod(s) for s in self.param_shapes().values())
        if non_embedding:
            total -= self.block_size * self.n_embd
        return total

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """FLOPs per token (PaLM appendix B, as nanoGPT's estimate_mfu): 6N + 12·L·C·T for a
        training step (forward + backward), a third of that for a forward pass."""
        T = self.block_size if seq_len is None else seq_len
        n = self.num_params(non_embedding=True)
        fwd_bwd = 6 * n + 12 * self.n_layer * self.n_embd * T
        return fwd_bwd if training else fwd_bwd // 3


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
