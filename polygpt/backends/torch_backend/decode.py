"""The one-token decode step, lean: `GPT.forward(tokens, cache)` at T = 1 in fewer torch calls.

At the reference size (0.8M parameters, 128 wide) a decoded token is a few dozen tiny kernels,
so the Python-side cost of each call, not arithmetic, sets the speed. `GPT.forward` spends
~30 torch calls and 8 nn.Module calls per layer on a token; `step` computes the same function
with the same cache (`KVCache.update_and_fetch`, `positions`, `mask`) in ~15 calls per layer:
functional calls on the weights, the residual adds fused into the projections
(`torch.addmm(x, y, W)`), and each weight matrix transposed once per cache so a one-row matrix
product reads it in order (~1.6x faster than against the (out, in) layout here).

It earns its place by measurement (scripts/bench_generate.py, `cached b1`, interleaved A/B on
the 2-core x86 box, 1 thread, loaded): GPT.forward decoding at b1 ran ~2x slower per token.
The alternatives measured: torch.compile of GPT.forward over a static cache compiled in
30-105 s (too slow to start for `polygpt sample`) and torch.jit.trace of it was ~1.4x slower.
It serves float models made of plain nn.Linear layers; any other model (torch's dynamically
quantized int8 Linear) decodes through `GPT.forward` itself (`supports`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from polygpt.backends.torch_backend.model import GPT, KVCache
from polygpt.spec import LAYER_NORM_EPS


@dataclass
class _Layer:
    """One block's weights for `step`: LayerNorms as they are, projections as W^T (in, out)."""

    ln_1: tuple[torch.Tensor, torch.Tensor | None]
    c_attn: tuple[torch.Tensor, torch.Tensor | None]
    c_proj: tuple[torch.Tensor, torch.Tensor | None]
    ln_2: tuple[torch.Tensor, torch.Tensor | None]
    c_fc: tuple[torch.Tensor, torch.Tensor | None]
    mlp_proj: tuple[torch.Tensor, torch.Tensor | None]


# The transposed copies cost a second copy of every Linear weight: nothing at 0.8M parameters,
# but 340 MB next to GPT-2 124M's 500 MB of weights, where a batch-1 step is bound by reading the
# weights anyway and the (out, in) view reads them just as well. Above this many bytes of Linear
# weights the step uses views (no copy).
TRANSPOSE_COPY_MAX_BYTES = 32 << 20


def _wt(m: nn.Linear, copy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (m.weight.t().contiguous() if copy else m.weight.t()), m.bias


def supports(model: GPT) -> bool:
    """Whether every projection is a plain nn.Linear (not a quantized replacement)."""
    return all(
        type(m) is nn.Linear
        for b in model.transformer.h
        for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
    )


class LeanStep:
    """`step(tokens)` for one model and cache: the weights read (and transposed) once."""

    def __init__(self, model: GPT, cache: list[KVCache]):
        tr = model.transformer
        self.cache = cache
        self.wte, self.wpe, self.ln_f = tr.wte.weight, tr.wpe.weight, (tr.ln_f.weight, tr.ln_f.bias)
        self.pe = self.wpe.unbind(0)  # one view per position row
        self.head = self.wte.t()  # the tied head, (C, V)
        linear_bytes = sum(
            m.weight.nbytes
            for b in tr.h
            for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
        )
        copy = linear_bytes <= TRANSPOSE_COPY_MAX_BYTES
        self.layers = [
            _Layer(
                (b.ln_1.weight, b.ln_1.bias),
                _wt(b.attn.c_attn, copy),
                _wt(b.attn.c_proj, copy),
                (b.ln_2.weight, b.ln_2.bias),
                _wt(b.mlp.c_fc, copy),
                _wt(b.mlp.c_proj, copy),
            )
            for b in tr.h
        ]
        self.approximate = tr.h[0].mlp.approximate
        # the q/k/v projection writes here; q, k, v are views of it (B, nh, 1, hs)
        B, spec, w = cache[0].keys.shape[0], model.spec, self.wte
        self.qkv = torch.empty(B, 3 * spec.n_embd, dtype=w.dtype, device=w.device)
        self.qkv_views = self.qkv.view(B, 3, spec.n_head, 1, spec.head_dim).unbind(1)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) appended to the cache -> next-token logits (B, V)."""
        first = self.cache[0]
        if first.offset >= first.max_len:
            raise RuntimeError("KV cache is full: the caller must slide the window first")
        x = self.wte.index_select(0, tokens)  # (B, C)
        if first.rows.valid is None:  # no padding: the position is the offset for every row
            x.add_(self.pe[first.offset])
        else:
            x.add_(self.wpe.index_select(0, first.positions(1).view(-1)))
        mask = first.mask(1)  # None, or (B, 1, 1, L) without the rows' padding
        qkv, (q, k, v), C = self.qkv, self.qkv_views, (x.shape[1],)
        for layer, cache in zip(self.layers, self.cache):
            h = torch.layer_norm(x, C, *layer.ln_1, LAYER_NORM_EPS)
            _linear(h, *layer.c_attn, out=qkv)
            keys, values = cache.update_and_fetch(k, v)  # (B, nh, L, hs)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, nh, 1, hs)
            _linear(y.view_as(x), *layer.c_proj, out=x, residual=True)
            h = torch.layer_norm(x, C, *layer.ln_2, LAYER_NORM_EPS)
            h = F.gelu(_linear(h, *layer.c_fc), approximate=self.approximate)
            _linear(h, *layer.mlp_proj, out=x, residual=True)
        return torch.mm(torch.layer_norm(x, C, *self.ln_f, LAYER_NORM_EPS), self.head)


def _linear(x, wt, b, out=None, residual=False):
    """x @ wt + b in one BLAS call; into `out`, or added to it (the residual) in place."""
    if residual:
        out.addmm_(x, wt)
        return out if b is None else out.add_(b)
    if b is None:
        return torch.mm(x, wt, out=out)
    return torch.addmm(b, x, wt, out=out)
