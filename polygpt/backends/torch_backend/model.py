"""GPT-2 in PyTorch, built from a ModelSpec.

Classes in dependency order as nanoGPT's model.py. Attribute names produce exactly the
canonical parameter names of `spec.param_shapes()` (`transformer.h.0.attn.c_attn.weight`, ...);
the LM head is `F.linear(x, wte.weight)` so no `lm_head` parameter exists. The MLX twin
(`backends/mlx_backend/model.py`) mirrors these classes name for name.

One forward path, mlx-lm's shape: `GPT.forward(idx, cache=None, ...)` serves training, prefill
and decode. With a cache (one object per layer whose `update_and_fetch(k, v)` stores the new
keys and values and returns those to attend to: the slot cache's row operations in decode.py)
the caller passes each token's position ids and the attention mask, which the slot cache's
bookkeeping (backends/common.py) computes once per forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from polygpt.backends import training_rules
from polygpt.spec import LAYER_NORM_EPS, ModelSpec


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's nn.LayerNorm can't drop only the bias)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LAYER_NORM_EPS)


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
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache=None
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, nh, L, hs)
        p = self.dropout if self.training else 0.0
        if cache is None and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            y = _causal_attention(q, k, v, p)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None and T > 1
            )
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


_CAUSAL_MASKS: dict[tuple, torch.Tensor] = {}


def _causal_attention(q, k, v, dropout_p: float) -> torch.Tensor:
    """softmax(q·kᵀ/√d + causal mask)·v in three batched ops, for bf16 on the CPU: there
    SDPA's flash kernel runs its backward several times slower than these ops (docs/
    BENCHMARKS.md, "Training speed against nanoGPT"). SDPA's function within float rounding;
    the softmax in fp32, as flash computes it."""
    B, H, T, D = q.shape
    key = (T, q.dtype, q.device)
    mask = _CAUSAL_MASKS.get(key)
    if mask is None:
        mask = _CAUSAL_MASKS[key] = torch.full((T, T), float("-inf"), dtype=q.dtype).triu_(1)
    att = torch.baddbmm(
        mask.expand(B * H, T, T),
        q.reshape(B * H, T, D),
        k.reshape(B * H, T, D).transpose(1, 2),
        alpha=D**-0.5,
    )
    att = att.softmax(-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0:
        att = F.dropout(att, dropout_p, training=True)
    return torch.bmm(att, v.reshape(B * H, T, D)).view(B, H, T, D)


_GELU_K = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5·x·(1 + tanh(z)) written x·sigmoid(2z), z = sqrt(2/π)(x + 0.044715x³): the same
    function within float rounding (0.5(1 + tanh z) = sigmoid(2z); max diff 5e-7). ATen's CPU
    tanh-GELU forward is its slow part and these five passes beat it (docs/BENCHMARKS.md,
    "Figures behind the code"); its backward costs the same as erf's."""
    s = torch.addcmul(x, x * x, x, value=0.044715).mul_(2 * _GELU_K).sigmoid_()  # sigmoid(2z)
    return s.mul_(x)


class _GeluTanh(torch.autograd.Function):
    """Training's tanh GELU: the fast forward above, ATen's own backward (one kernel)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _gelu_tanh(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(g, x, approximate="tanh")


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate != "tanh":
        return F.gelu(x)
    if torch.compiler.is_compiling():
        # inductor fuses this into one loop; its vectorized exp is faster than its tanh
        return x / (1.0 + torch.exp(-2 * _GELU_K * (x + 0.044715 * x * x * x)))
    if x.dtype != torch.float32:  # ATen computes fp16/bf16 GELU in fp32 internally: keep it
        return F.gelu(x, approximate="tanh")
    if x.requires_grad:
        return _GeluTanh.apply(x)
    # one decode row: one op beats five (per-op overhead); a batch: fewer cycles per element
    return F.gelu(x, approximate="tanh") if x.numel() <= 8192 else _gelu_tanh(x)


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

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
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
        """The shared init rule (training_rules.init_rule), normals drawn from `generator`."""
        rules = training_rules.init_rule(self.spec)
        with torch.no_grad():
            for name, p in self.named_parameters():
                kind, value = rules[name]
                if kind == "normal":
                    p.normal_(0.0, value, generator=generator)
                else:
                    p.fill_(value)

    def forward(
        self,
        idx: torch.Tensor,
        cache: list | None = None,
        pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V). With a cache, idx continues each row's cached
        sequence at position ids `pos` ((T,) or (B, T)) under `mask` (bool (B, 1, T, L), True =
        attend; None: causal). `last` (B,): only the logits at row b's index last[b],
        (B, 1, V)."""
        B, T = idx.size()
        tr = self.transformer
        if cache is None:
            pos, mask, cache = torch.arange(T, device=idx.device), None, [None] * len(tr.h)
        x = tr.drop(tr.wte(idx) + tr.wpe(pos))  # (B, T, C)
        for block, layer_cache in zip(tr.h, cache):
            x = block(x, mask, layer_cache)
        if last is not None:
            x = x[torch.arange(B, device=x.device), last][:, None]
        return self.head(tr.ln_f(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The tied LM head: wte's matrix, or its prepared form (prepared.Embedding)."""
        wte = self.transformer.wte
        return F.linear(x, wte.weight) if isinstance(wte, nn.Embedding) else wte.as_linear(x)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
