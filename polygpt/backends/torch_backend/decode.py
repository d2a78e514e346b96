"""The KV-cached decode step, lean: one token per row through the model in ~45 torch ops.

At the reference size (0.8M parameters, 128-wide) one decoded token is a few dozen tiny
kernels, so per-op overhead, not arithmetic, sets the speed; `GPT.forward` with a cache spends
most of its time in nn.Module calls, view bookkeeping and mask building. `Decoder.step` computes
exactly the same function with what is left when that is stripped away:

- the weights are read once into per-layer tuples (transposed *views*, no copies, so a model
  that keeps training stays in sync) and the step is a flat loop of functional calls;
- the q/k/v projection writes into a preallocated buffer (`torch.mm(..., out=)`) whose k/v half
  is copied into the cache with one `copy_`, through destination and source views of the cache
  made once per Decoder (the cache buffers are reused across re-prefills of the same batch);
- the residual adds are fused into the projections (`torch.addmm(x, y, W)`), no mask is built
  unless a row is left-padded, and nothing syncs with the host but the final logits.

`torch.compile` of this step (static shapes, attention over the whole cache) and TorchScript
were tried on the 2-core CPU: compiling costs ~30 s and the compiled step was no faster;
scripting is deprecated and gained ~15%. The int8 (dynamically quantized) model runs the same
loop through its quantized Linear modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from polygpt.backends.torch_backend.model import GPT, KVCache
from polygpt.spec import LAYER_NORM_EPS


class cpu_threads:  # noqa: N801 (a context manager used like a function)
    """Run a block with `n` intra-op CPU threads, then restore the count (~8 us a switch).

    Generation runs single-threaded on the CPU: its ops are far too small to split across
    cores, and OpenMP threads meet at a barrier after every op, so on a loaded machine a
    thread waiting for a busy core stalls every op (measured on the 2-core box under load:
    `polygpt sample` at 5-84 tokens/s with 2 threads, 700-1100 with 1)."""

    def __init__(self, n: int, device: str = "cpu"):
        self.n = n if device == "cpu" else 0
        self.prev = 0

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        if self.n and self.prev != self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        if self.n and self.prev != self.n:
            torch.set_num_threads(self.prev)


def _plain(m: nn.Module) -> bool:
    return type(m) is nn.Linear


class _Prefixes(list):
    """Views (k, v) of a layer's cache up to each position, created on first use and kept:
    a Decoder lives across the window's re-prefills, so each is made once per generation."""

    def __init__(self, kv: torch.Tensor):
        super().__init__([None] * kv.shape[3])
        self.kv = kv

    def __getitem__(self, p: int):
        views = list.__getitem__(self, p)
        if views is None:
            views = self.kv.narrow(3, 0, p + 1).unbind(1)
            self[p] = views
        return views


def _t(w: torch.Tensor) -> torch.Tensor:
    """W^T (in, out) as its own contiguous copy: a one-row matmul against a row-major (in, out)
    matrix streams it in order and measured ~1.6x faster here than against the (out, in) view."""
    return w.t().contiguous()


# The copies above cost a second copy of every Linear weight: nothing at 0.8M parameters, but
# 340 MB next to GPT-2 124M's 500 MB of weights, where a batch-1 step is bound by reading the
# weights anyway and the (out, in) view reads them just as well. Above this many bytes of
# Linear weights the Decoder uses views (no copy).
TRANSPOSE_COPY_MAX_BYTES = 32 << 20


def _transposer(linears: list[nn.Module]):
    """_t for small models, a plain view (w.t()) for large ones."""
    total = sum(m.weight.nbytes for m in linears)
    return _t if total <= TRANSPOSE_COPY_MAX_BYTES else torch.Tensor.t


class Decoder:
    """A KV cache for `batch` rows plus the lean decode step over it."""

    def __init__(self, model: GPT, batch: int):
        spec = model.spec
        tr = model.transformer
        self.model, self.batch = model, batch
        self.C, self.nh, self.hs = spec.n_embd, spec.n_head, spec.head_dim
        self.approximate = "tanh" if spec.activation == "gelu_tanh" else "none"
        wte = tr.wte.weight
        self.cache = KVCache(spec, batch, spec.block_size, wte.dtype, wte.device)
        self.wte, self.wpe, self.head = wte, tr.wpe.weight, wte.t()
        self.pe = list(self.wpe.unbind(0))  # position rows as views, one per position
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
        self.plain = all(
            _plain(m)
            for b in tr.h
            for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
        )
        B, C, nh, hs = batch, self.C, self.nh, self.hs
        t = (
            _transposer(
                [m for b in tr.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
            )
            if self.plain
            else None
        )
        self.layers = []
        for block, kv in zip(tr.h, self.cache.kv):
            qkv = torch.empty(B, 3 * C, dtype=wte.dtype, device=wte.device)
            q5 = qkv.view(B, 3, nh, 1, hs)
            dst = kv.unbind(3)  # (B, 2, nh, hs) at each position: all L views in one op
            src = _Prefixes(kv)  # k, v (B, nh, p+1, hs) up to each position, made on first use
            if self.plain:
                a, m = block.attn, block.mlp
                lin = (
                    t(a.c_attn.weight),
                    a.c_attn.bias,
                    t(a.c_proj.weight),
                    a.c_proj.bias,
                    t(m.c_fc.weight),
                    m.c_fc.bias,
                    t(m.c_proj.weight),
                    m.c_proj.bias,
                )
            else:
                lin = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
            self.layers.append(
                (
                    block.ln_1.weight,
                    block.ln_1.bias,
                    block.ln_2.weight,
                    block.ln_2.bias,
                    lin,
                    qkv,
                    q5[:, 0],
                    qkv.view(B, 3, nh, hs)[:, 1:],
                    dst,
                    src,
                )
            )
        self.pos = None  # (B, L) position ids of left-padded rows
        self.mask = None  # (B, 1, 1, L) True where a key is not padding

    def matches(self, model: GPT, batch: int) -> bool:
        return self.model is model and self.batch == batch

    def prefill(self, tokens: torch.Tensor, pad: torch.Tensor, any_pad: bool) -> torch.Tensor:
        """Fill the cache from left-padded tokens (B, T); next-token logits (B, V)."""
        self.cache.reset(pad, any_pad)
        if any_pad:
            keys = torch.arange(self.cache.max_len, device=pad.device)
            self.pos = (keys[None, :] - pad[:, None]).clamp_(min=0)
            self.mask = (keys[None, :] >= pad[:, None])[:, None, None, :]
        return self.model(tokens, self.cache, last_only=True)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (B,) at the next position; next-token logits (B, V)."""
        cache = self.cache
        p = cache.offset
        if p >= cache.max_len:
            raise RuntimeError("KV cache is full: the caller must slide the window first")
        x = self.wte.index_select(0, tokens)  # (B, C)
        if cache.any_pad:
            x.add_(self.wpe.index_select(0, self.pos[:, p]))
            mask = self.mask[..., : p + 1]
        else:
            x.add_(self.pe[p])
            mask = None
        x = self._layers_plain(x, p, mask) if self.plain else self._layers_modules(x, p, mask)
        cache.offset = p + 1
        return torch.mm(torch.layer_norm(x, (self.C,), *self.ln_f, LAYER_NORM_EPS), self.head)

    def _layers_plain(self, x: torch.Tensor, p: int, mask) -> torch.Tensor:
        B, C, eps, approx = self.batch, (self.C,), LAYER_NORM_EPS, self.approximate
        # C bindings, not the Python wrappers in torch.nn.functional (~0.5 us a call here)
        sdpa, ln, mm, gelu_ = (
            torch._C._nn.scaled_dot_product_attention,
            torch.layer_norm,
            torch.mm,
            torch._C._nn.gelu_,
        )
        for w1, b1, w2, b2, (wa, ba, wp, bp, wf, bf, wm, bm), qkv, q, kv, dst, src in self.layers:
            h = ln(x, C, w1, b1, eps)
            if ba is None:
                mm(h, wa, out=qkv)
            else:
                torch.addmm(ba, h, wa, out=qkv)
            dst[p].copy_(kv)
            k, v = src[p]
            y = sdpa(q, k, v, attn_mask=mask).view(B, -1)  # (B, nh, 1, hs) -> (B, C)
            x.addmm_(y, wp)  # the residual add, fused and in place
            if bp is not None:
                x.add_(bp)
            h = ln(x, C, w2, b2, eps)
            h = mm(h, wf) if bf is None else torch.addmm(bf, h, wf)
            x.addmm_(gelu_(h, approximate=approx), wm)
            if bm is not None:
                x.add_(bm)
        return x

    def _layers_modules(self, x: torch.Tensor, p: int, mask) -> torch.Tensor:
        """The same step through Linear modules (torch's dynamically quantized int8 ones)."""
        B, C, nh, hs, eps = self.batch, (self.C,), self.nh, self.hs, LAYER_NORM_EPS
        for w1, b1, w2, b2, (c_attn, c_proj, c_fc, m_proj), _, _, _, dst, src in self.layers:
            qkv = c_attn(F.layer_norm(x, C, w1, b1, eps)).view(B, 3, nh, 1, hs)
            dst[p].copy_(qkv[:, 1:, :, 0])
            k, v = src[p]
            y = F.scaled_dot_product_attention(qkv[:, 0], k, v, attn_mask=mask).view(B, -1)
            x = x + c_proj(y)
            h = F.gelu(c_fc(F.layer_norm(x, C, w2, b2, eps)), approximate=self.approximate)
            x = x + m_proj(h)
        return x
