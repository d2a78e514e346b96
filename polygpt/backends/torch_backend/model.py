"""GPT-2 in PyTorch, built from a ModelSpec.

Classes in dependency order as nanoGPT's model.py. Attribute names produce exactly the
canonical parameter names of `spec.param_shapes()` (`transformer.h.0.attn.c_attn.weight`, ...);
the LM head is `F.linear(x, wte.weight)` so no `lm_head` parameter exists. The MLX twin
(`backends/mlx_backend/model.py`) mirrors these classes name for name.

KV cache: one preallocated (B, 2, nh, max_len, hs) tensor per layer (keys at [:, 0], values at
[:, 1], so a decode step writes both with one copy), written in place. Rows may be left-padded:
`KVCache.pad[b]` leading positions of row b are padding, masked out of every attention and
excluded from position ids. The lean one-token decode step lives in decode.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from polygpt.spec import INIT_STD, LAYER_NORM_EPS, ModelSpec


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's nn.LayerNorm can't drop only the bias)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LAYER_NORM_EPS)


class KVCache:
    """Per-layer preallocated keys/values; `offset` positions are filled (pads included)."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, dtype, device):
        shape = (batch, 2, spec.n_head, max_len, spec.head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.n_layer)]
        self.max_len = max_len
        self.reset(torch.zeros(batch, dtype=torch.long, device=device), any_pad=False)

    def reset(self, pad: torch.Tensor, any_pad: bool) -> None:
        """Empty the cache for new rows with `pad` (B,) leading pads (`any_pad`: pad.any(),
        passed in because the caller knows it without a device sync)."""
        self.offset = 0
        self.pad = pad  # (B,) int64
        self.any_pad = any_pad

    def key_mask(self, t: int) -> torch.Tensor | None:
        """(B, 1, t, offset+t) boolean attention mask (True = attend) for t new queries."""
        L = self.offset + t
        if not self.any_pad and (t == 1 or self.offset == 0):
            return None  # one new query sees the whole cache; a fresh prompt is plain causal
        keys = torch.arange(L, device=self.pad.device)
        queries = torch.arange(self.offset, L, device=self.pad.device)
        mask = keys[None, :] <= queries[:, None]  # causal (t, L)
        valid = keys[None, :] >= self.pad[:, None]  # (B, L): not padding
        # A padding query may see only itself, so no softmax row is empty (NaN-free).
        self_ = keys[None, :] == queries[:, None]
        return (mask[None] & valid[:, None, :]) | self_[None]  # (B, t, L)


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        C = spec.n_embd
        self.c_attn = nn.Linear(C, 3 * C, bias=spec.bias)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(C, C, bias=spec.bias)
        self.resid_dropout = nn.Dropout(spec.dropout)
        self.n_head = spec.n_head
        self.dropout = spec.dropout

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, hs).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, nh, T, hs)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            start, end = cache.offset, cache.offset + T
            kv = cache.kv[layer]  # (B, 2, nh, max_len, hs)
            kv[:, 0, :, start:end] = k
            kv[:, 1, :, start:end] = v
            k, v = kv[:, 0, :, :end], kv[:, 1, :, :end]  # (B, nh, L, hs)
            if mask is None and T > 1 and start == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=None if mask is None else mask[:, None]
                )
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """F.gelu; under torch.compile the tanh form is written x / (1 + exp(-2z)), the same
    function (0.5(1 + tanh z) = sigmoid(2z)) within float rounding: inductor's vectorized exp
    is about twice as fast as its tanh on CPU (and eager ATen has no faster form to offer)."""
    if approximate == "tanh" and torch.compiler.is_compiling():
        return x / (1.0 + torch.exp(-_GELU_K * (x + 0.044715 * x * x * x)))
    return F.gelu(x, approximate=approximate)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.c_fc = nn.Linear(spec.n_embd, 4 * spec.n_embd, bias=spec.bias)
        self.c_proj = nn.Linear(4 * spec.n_embd, spec.n_embd, bias=spec.bias)
        self.dropout = nn.Dropout(spec.dropout)
        self.approximate = "tanh" if spec.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(gelu(self.c_fc(x), self.approximate)))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.ln_1 = LayerNorm(spec.n_embd, spec.bias)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = LayerNorm(spec.n_embd, spec.bias)
        self.mlp = MLP(spec)

    def forward(self, x, cache=None, layer=0, mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(spec.vocab_size, spec.n_embd),
                wpe=nn.Embedding(spec.block_size, spec.n_embd),
                drop=nn.Dropout(spec.dropout),
                h=nn.ModuleList([Block(spec) for _ in range(spec.n_layer)]),
                ln_f=LayerNorm(spec.n_embd, spec.bias),
            )
        )

    def init_weights(self, generator: torch.Generator) -> None:
        """normal(0, 0.02), residual projections 0.02/sqrt(2·n_layer), biases 0, LN weight 1."""
        resid = set(self.spec.residual_projections())
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim >= 2:
                    std = INIT_STD / math.sqrt(2 * self.spec.n_layer) if name in resid else INIT_STD
                    p.normal_(0.0, std, generator=generator)
                elif (
                    name.endswith("ln_1.weight")
                    or name.endswith("ln_2.weight")
                    or name.endswith("ln_f.weight")
                ):
                    p.fill_(1.0)
                else:
                    p.zero_()

    def forward(
        self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V), or (B, 1, V) with last_only."""
        B, T = idx.size()
        tr = self.transformer
        mask = None
        if cache is None:
            pos = torch.arange(T, device=idx.device)
        else:
            pos = torch.arange(cache.offset, cache.offset + T, device=idx.device)
            if cache.any_pad:
                pos = (pos[None, :] - cache.pad[:, None]).clamp_(min=0)  # (B, T)
            mask = cache.key_mask(T)
        x = tr.drop(tr.wte(idx) + tr.wpe(pos))  # (B, T, C)
        for i, block in enumerate(tr.h):
            x = block(x, cache, i, mask)
        if cache is not None:
            cache.offset += T
        if last_only:
            x = x[:, -1:]
        x = tr.ln_f(x)
        return F.linear(x, tr.wte.weight)  # tied head

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
