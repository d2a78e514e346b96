"""GPT-2 in MLX, built from a ModelSpec: the twin of backends/torch_backend/model.py.

Same classes in the same order with the same attribute names, so the flattened MLX parameter
keys (`transformer.h.0.attn.c_attn.weight`, ...) equal torch's state_dict keys and
`spec.param_shapes()` with no renaming table. MLX's Linear stores weights (out, in) as torch
does; the LM head is `wte.as_linear(x)` (mlx-lm's gpt2), so no `lm_head` parameter exists.

One forward path, as torch's (and mlx-lm's): `GPT.__call__(idx, cache=None, ...)` serves
training, prefill and decode. With a cache (one object per layer whose `update_and_fetch(k, v)`
stores the new keys and values and returns those to attend to: the slot cache's row operations
in decode.py) the caller passes the position ids and the attention mask, computed once per
forward. The compiled decode step (decode.py) runs this same forward.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from polygpt.backends import training_rules
from polygpt.spec import LAYER_NORM_EPS, ModelSpec


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (same parameters as the torch twin)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = mx.ones((ndim,))
        if bias:
            self.bias = mx.zeros((ndim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, self.weight, self.get("bias"), LAYER_NORM_EPS)


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        C = spec.n_embd
        self.c_attn = nn.Linear(C, 3 * C, bias=spec.bias)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(C, C, bias=spec.bias)
        self.resid_dropout = nn.Dropout(spec.dropout)
        self.n_head = spec.n_head
        self.dropout = spec.dropout
        self.attn_dropout = nn.Dropout(spec.dropout)

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache=None) -> mx.array:
        B, T, C = x.shape
        hs = C // self.n_head
        scale = 1.0 / math.sqrt(hs)
        if T == 1:  # one query per row: (B, 3, nh, 1, hs) is already the heads' layout (no copy)
            qkv = self.c_attn(x).reshape(B, 3, self.n_head, 1, hs)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        else:
            qkv = self.c_attn(x).reshape(B, T, 3, self.n_head, hs).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, nh, L, hs)
        if cache is None and self.training and self.dropout > 0:
            y = self._attention_with_dropout(q, k, v, scale)
        else:
            if mask is None:
                mask = "causal" if T > 1 else None
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        # re-assemble heads: (B, T, C); with T = 1, (B, nh, 1, hs) is already that layout
        y = y.reshape(B, 1, C) if T == 1 else y.transpose(0, 2, 1, 3).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _attention_with_dropout(self, q, k, v, scale):
        """Explicit attention for training with dropout (the fused kernel has no dropout)."""
        T = q.shape[2]
        att = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, nh, T, T)
        causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
        att = mx.where(causal, att, mx.array(-math.inf, dtype=att.dtype))
        att = mx.softmax(att.astype(mx.float32), axis=-1).astype(q.dtype)
        return self.attn_dropout(att) @ v  # (B, nh, T, hs)


# GPT-2's tanh GELU without calling tanh. MLX's CPU backend evaluates tanh/exp one scalar at a
# time (docs/BENCHMARKS.md, "Figures behind the code": nn.gelu_approx's share of a training
# step on x86), while multiply-add
# chains compile into one vectorized loop. tanh here is Eigen's rational approximation
# (generic_fast_tanh_float, a few ulp; max |diff| to torch's GELU 1e-6, derivative 5e-6),
# computed in float32 for every input dtype (as torch's CPU kernels do for fp16/bf16).
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (
    4.89352455891786e-03,
    6.37261928875436e-04,
    1.48572235717979e-05,
    5.12229709037114e-08,
    -8.60467152213735e-11,
    2.00018790482477e-13,
    -2.76076847742355e-16,
)  # odd numerator: coefficients of x, x^3, ..., x^13
_TANH_Q = (
    4.89352518554385e-03,
    2.26843463243900e-03,
    1.18534705686654e-04,
    1.19825839466702e-06,
)  # even denominator: 1, x^2, ..., x^6
_GELU_K = math.sqrt(2.0 / math.pi)


def _tanh(x: mx.array) -> mx.array:
    x = mx.clip(x, -_TANH_CLAMP, _TANH_CLAMP)
    x2 = x * x
    p = _TANH_P[-1]
    for c in _TANH_P[-2::-1]:
        p = p * x2 + c
    q = _TANH_Q[-1]
    for c in _TANH_Q[-2::-1]:
        q = q * x2 + c
    return x * p / q


@partial(mx.compile, shapeless=True)
def _gelu_tanh_fwd(x: mx.array) -> mx.array:
    x32 = x.astype(mx.float32)
    y = 0.5 * x32 * (1.0 + _tanh(_GELU_K * (x32 + 0.044715 * x32 * x32 * x32)))
    return y.astype(x.dtype)


@partial(mx.compile, shapeless=True)
def _gelu_tanh_bwd(x: mx.array, g: mx.array) -> mx.array:
    x32 = x.astype(mx.float32)
    x2 = x32 * x32
    t = _tanh(_GELU_K * x32 * (1.0 + 0.044715 * x2))
    d = 0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * _GELU_K * (1.0 + 3 * 0.044715 * x2)
    return (g.astype(mx.float32) * d).astype(x.dtype)


@mx.custom_function
def gelu_tanh(x: mx.array) -> mx.array:
    """0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))), torch's gelu(approximate="tanh")."""
    return _gelu_tanh_fwd(x)


@gelu_tanh.vjp
def _gelu_tanh_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (tuple, list)) else primals
    return _gelu_tanh_bwd(x, cotangent)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.c_fc = nn.Linear(spec.n_embd, 4 * spec.n_embd, bias=spec.bias)
        self.c_proj = nn.Linear(4 * spec.n_embd, spec.n_embd, bias=spec.bias)
        self.dropout = nn.Dropout(spec.dropout)
        self.act = gelu_tanh if spec.activation == "gelu_tanh" else nn.gelu

    def __call__(self, x: mx.array) -> mx.array:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.ln_1 = LayerNorm(spec.n_embd, spec.bias)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = LayerNorm(spec.n_embd, spec.bias)
        self.mlp = MLP(spec)

    def __call__(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        # A bare Module as torch's ModuleDict: keys become `transformer.wte.weight`, ...
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(spec.vocab_size, spec.n_embd)
        self.transformer.wpe = nn.Embedding(spec.block_size, spec.n_embd)
        self.transformer.drop = nn.Dropout(spec.dropout)
        self.transformer.h = [Block(spec) for _ in range(spec.n_layer)]
        self.transformer.ln_f = LayerNorm(spec.n_embd, spec.bias)

    def init_weights(self, key: mx.array) -> None:
        """The shared init rule (training_rules.init_rule), normals drawn from MLX's RNG (`key`), so
        the values differ from torch's init; to start both backends from the same weights,
        initialize once and load the saved safetensors."""
        rules = training_rules.init_rule(self.spec)
        params = self.named_parameters()
        keys = mx.random.split(key, len(params))
        new = []
        for k, (name, p) in zip(keys, params.items()):
            kind, value = rules[name]
            if kind == "normal":
                new.append((name, mx.random.normal(p.shape, key=k) * value))
            else:
                new.append((name, mx.full(p.shape, value)))
        self.load_weights(new)

    def named_parameters(self) -> dict[str, mx.array]:
        """Canonical name -> array, in spec.param_shapes() order (torch's state_dict order)."""
        from mlx.utils import tree_flatten

        flat = dict(tree_flatten(self.parameters()))
        return {name: flat[name] for name in self.spec.param_shapes()}

    def __call__(
        self,
        idx: mx.array,
        cache: list | None = None,
        pos: mx.array | None = None,
        mask: mx.array | None = None,
        last: mx.array | None = None,
    ) -> mx.array:
        """idx (B, T) -> logits (B, T, V). With a cache, idx continues each row's cached
        sequence at position ids `pos` ((T,) or (B, T)) under `mask` (bool (B, 1, T, L), True =
        attend; None: causal). `last` (B,): only the logits at row b's index last[b],
        (B, 1, V)."""
        B, T = idx.shape
        tr = self.transformer
        if cache is None:
            pos, mask, cache = mx.arange(T), None, [None] * len(tr.h)
        x = tr.drop(tr.wte(idx) + tr.wpe(pos))  # (B, T, C)
        for block, layer_cache in zip(tr.h, cache):
            x = block(x, mask, layer_cache)
        if last is not None:
            x = x[mx.arange(B), last][:, None]
        x = tr.ln_f(x)
        return tr.wte.as_linear(x)  # tied head

    def loss(self, idx: mx.array, targets: mx.array) -> mx.array:
        logits = self(idx)
        return nn.losses.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).astype(mx.float32),
            targets.reshape(-1),
            reduction="mean",
        )
