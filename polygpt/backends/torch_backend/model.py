"""GPT-2 in PyTorch, built from a ModelSpec.

Classes in dependency order as nanoGPT's model.py. Attribute names produce exactly the
canonical parameter names of `spec.param_shapes()` (`transformer.h.0.attn.c_attn.weight`, ...);
the LM head is `F.linear(x, wte.weight)` so no `lm_head` parameter exists. The MLX twin
(`backends/mlx_backend/model.py`) mirrors these classes name for name.

One forward path, mlx-lm's shape: `GPT.forward(idx, cache=None, ...)` serves training, prefill
and decode. With a cache (one object per layer whose `update_and_fetch(k, v)` stores the new
keys and values and returns those to attend to: the slot cache's row operations in decode.py)
the caller passes each token's position ids and the attention mask, which the slot cache's
plans (backends/slots.py) compute once per forward.

The blocks are written functionally on their own tensors (`add_linear`, `layer_norm`, each
projection's `forward`): a decoded token of a small model costs Python calls more than
arithmetic (docs/BENCHMARKS.md, "Figures behind the code"), so the forward makes no
nn.Module call per sublayer, and a prepared model (prepared.py: packed, transposed or
quantized matrices) runs this same code through its modules' `forward` and `add_to`. Every
op is out of place where training's autograd needs it. The hot path reads sublayers and
weights from the modules' dicts (`_modules`, `_parameters`): nn.Module's `__getattr__` is a
Python call per lookup, as dear as a small op at the reference size.
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
        self.shape = (ndim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(self, x)


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        C = spec.n_embd
        self.c_attn = nn.Linear(C, 3 * C, bias=spec.bias)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(C, C, bias=spec.bias)
        self.resid_dropout = nn.Dropout(spec.dropout)
        self.n_head = spec.n_head
        self.dropout = spec.dropout

    def forward(self, x: torch.Tensor, B: int, mask=None, cache=None) -> torch.Tensor:
        """x (B·T, C) rows -> the heads' attention output (B·T, C), before c_proj (which the
        block adds onto the residual stream)."""
        N, C = x.shape
        T, nh = N // B, self.n_head
        qkv = self._modules["c_attn"].forward(x)  # (B·T, 3C)
        if T == 1:  # one query per row: (B, 3, nh, 1, hs) is already the heads' layout
            q, k, v = qkv.view(B, 3, nh, 1, C // nh).unbind(1)
        else:
            q, k, v = qkv.view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4).unbind(0)
        # q, k, v: (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, nh, L, hs)
        p = self.dropout if self.training else 0.0
        if cache is None and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            y = _causal_attention(q, k, v, p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, mask, p, mask is None and T > 1)
        if T == 1:  # (B, nh, 1, hs) is already the rows' layout
            return y.view(N, C)
        return y.transpose(1, 2).reshape(N, C)  # re-assemble heads: (B·T, C)


def add_linear(x: torch.Tensor, m: nn.Module, h: torch.Tensor, p: float) -> torch.Tensor:
    """x + dropout_p(h·Wᵀ + b): the residual add, out of place for training's autograd; a
    prepared projection (inference only: p is 0) adds into x in place, fused into the
    product where its kernel can (`add_to`)."""
    if type(m) is not nn.Linear:
        return m.add_to(x, h)
    w = m._parameters
    y = F.linear(h, w["weight"], w["bias"])
    return x + (F.dropout(y, p, True) if p > 0 else y)


def layer_norm(m: LayerNorm, x: torch.Tensor) -> torch.Tensor:
    p = m._parameters
    return torch.layer_norm(x, m.shape, p["weight"], p.get("bias"), LAYER_NORM_EPS)


_CAUSAL_MASKS: dict[tuple, torch.Tensor] = {}


def _causal_attention(q, k, v, dropout_p: float) -> torch.Tensor:
    """softmax(q·kᵀ/√d + causal mask)·v in three batched ops, for bf16 on the CPU: there
    SDPA's flash kernel runs its backward slower than these ops (docs/
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
    if not x.requires_grad and x.numel() <= 8192:
        return F.gelu(x, approximate="tanh")  # a few decode rows: one op beats five (per op)
    if torch.compiler.is_compiling():
        # inductor fuses this into one loop; its vectorized exp is faster than its tanh
        return x / (1.0 + torch.exp(-2 * _GELU_K * (x + 0.044715 * x * x * x)))
    if x.dtype != torch.float32:  # ATen computes fp16/bf16 GELU in fp32 internally: keep it
        return F.gelu(x, approximate="tanh")
    if x.requires_grad:
        return _GeluTanh.apply(x)
    return _gelu_tanh(x)  # a batch: fewer cycles per element


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.c_fc = nn.Linear(spec.n_embd, 4 * spec.n_embd, bias=spec.bias)
        self.c_proj = nn.Linear(4 * spec.n_embd, spec.n_embd, bias=spec.bias)
        self.dropout = nn.Dropout(spec.dropout)
        self.approximate = "tanh" if spec.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C) -> the hidden activations (N, 4C), before c_proj (added by the block)."""
        return gelu(self._modules["c_fc"].forward(x), self.approximate)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.ln_1 = LayerNorm(spec.n_embd, spec.bias)
        self.attn = CausalSelfAttention(spec)
        self.ln_2 = LayerNorm(spec.n_embd, spec.bias)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, B: int, mask=None, cache=None) -> torch.Tensor:
        """x (B·T, C): the residual stream as rows, so that every projection is one 2-D
        matrix product and its residual add can fuse into it (prepared.py)."""
        sub = self._modules
        attn, mlp = sub["attn"], sub["mlp"]
        train = self.training  # the dropouts' probabilities apply in training only
        p1 = attn._modules["resid_dropout"].p if train else 0.0
        p2 = mlp._modules["dropout"].p if train else 0.0
        y = attn.forward(layer_norm(sub["ln_1"], x), B, mask, cache)
        x = add_linear(x, attn._modules["c_proj"], y, p1)  # + resid_dropout(c_proj(y))
        h = mlp.forward(layer_norm(sub["ln_2"], x))
        return add_linear(x, mlp._modules["c_proj"], h, p2)  # + dropout(c_proj(h))


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
        B, T = idx.shape
        tr = self.transformer._modules  # (dict reads: see the module's docstring)
        blocks = tr["h"]._modules.values()
        if cache is None:
            pos, mask, cache = torch.arange(T, device=idx.device), None, [None] * len(blocks)
        x = self.embed(idx) + torch.embedding(tr["wpe"]._parameters["weight"], pos)  # (B, T, C)
        x = x.view(B * T, -1)  # rows (B·T, C)
        if self.training and tr["drop"].p > 0:
            x = F.dropout(x, tr["drop"].p, True)
        for block, layer_cache in zip(blocks, cache):
            x = block.forward(x, B, mask, layer_cache)
        if last is not None:  # one row each: (B, C)
            x, T = x.view(B, T, -1)[torch.arange(B, device=x.device), last], 1
        return self.head(layer_norm(tr["ln_f"], x)).view(B, T, -1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings: wte's rows, or its prepared lookup (prepared.Embedding)."""
        wte = self.transformer._modules["wte"]
        if type(wte) is nn.Embedding:
            return torch.embedding(wte._parameters["weight"], idx)
        return wte.forward(idx)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The tied LM head: wte's matrix, or its prepared form (prepared.Embedding)."""
        wte = self.transformer._modules["wte"]
        if type(wte) is nn.Embedding:
            return F.linear(x, wte._parameters["weight"])
        return wte.as_linear(x)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
