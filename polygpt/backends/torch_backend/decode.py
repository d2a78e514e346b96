"""Generation on the slot cache in torch: the row operations and the lean one-token step.

`SlotOps` implements `prefill_rows`, `decode_rows` and `copy_rows` (backends/slots.py has the
bookkeeping); both run `GPT.forward` with one `_Layer` writer per layer, except a float model's
decode step, which runs `LeanStep`.

LeanStep: `GPT.forward(tokens, cache)` at T = 1 in fewer torch calls. At the reference size
(0.8M parameters, 128 wide) a decoded token is a few dozen tiny kernels, so the Python-side cost
of each call, not arithmetic, sets the speed. `GPT.forward` spends ~30 torch calls and 8
nn.Module calls per layer on a token; the lean step computes the same function in ~15 calls per
layer: functional calls on the weights, the residual adds fused into the projections
(`torch.addmm(x, y, W)`), and each small weight matrix transposed once per model so a one-row
matrix product reads it in order (docs/BENCHMARKS.md, "Figures behind the code"). A prepared
projection (packed, int8, int4: prepared.py) is called as its module; the model the engine
decodes with is already prepared (backend `_new_slot_cache`).

Views. A decode step reads rows 0..n-1 up to the longest row's column, and writes one column:
both are views of the storage, made once per (n, column) and kept (`cache.views`), so a step
makes no view-making calls; rows of different lengths add a mask and one indexed write.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from polygpt.backends import slots
from polygpt.backends.torch_backend.model import GPT
from polygpt.spec import LAYER_NORM_EPS

MAX_VIEWS = 8192  # cached (n, column) view sets per cache; cleared beyond (a few MB of views)


class _Layer:
    """One layer's keys and values for one forward: `update_and_fetch(k, v)` writes the new
    keys and values (B, nh, T, hs) and returns those to attend to."""

    __slots__ = ("fetch", "keys", "values")

    def __init__(self, fetch, keys: torch.Tensor, values: torch.Tensor):
        self.fetch, self.keys, self.values = fetch, keys, values

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor):
        return self.fetch(self.keys, self.values, k, v)


def slot_cache(model: GPT, max_rows: int) -> slots.SlotCache:
    w = model.transformer.ln_f.weight  # LayerNorms carry the compute dtype
    zeros = lambda shape: torch.zeros(shape, dtype=w.dtype, device=w.device)  # noqa: E731
    return slots.allocate_slot_cache(model, max_rows, zeros)


def _layers(cache: slots.SlotCache, fetch) -> list[_Layer]:
    return [_Layer(fetch, k, v) for k, v in zip(cache.keys, cache.values)]


def prefill_rows(cache: slots.SlotCache, plan: slots.PrefillPlan) -> torch.Tensor:
    """Run a prefill plan; returns the logits after each row's last token (n, V)."""
    model, dev = cache.model, cache.keys[0].device
    rows = torch.from_numpy(plan.rows).to(dev)
    tokens = torch.from_numpy(plan.tokens).to(dev)
    last = torch.from_numpy(plan.last).to(dev)
    T = plan.width
    if plan.fresh:  # new keys only, plain causal: right padding follows every real query

        def fetch(K, V, k, v):
            K[:, :, :T].index_copy_(0, rows, k)
            V[:, :, :T].index_copy_(0, rows, v)
            return k, v

        pos, mask = torch.arange(T, device=dev), None
    else:  # continuing rows: attend to their cached columns too
        W = int(plan.ends().max())
        ri, j = np.nonzero(plan.valid)
        ri_t, j_t = torch.from_numpy(ri).to(dev), torch.from_numpy(j).to(dev)
        cols = torch.from_numpy(plan.starts[ri] + j).to(dev)
        dst = rows[ri_t]

        def fetch(K, V, k, v):
            Kr, Vr = K.index_select(0, rows)[:, :, :W], V.index_select(0, rows)[:, :, :W]
            kn, vn = k[ri_t, :, j_t], v[ri_t, :, j_t]  # the real tokens' keys (m, nh, hs)
            Kr[ri_t, :, cols], Vr[ri_t, :, cols] = kn, vn
            K[dst, :, cols], V[dst, :, cols] = kn, vn
            return Kr, Vr

        pos = torch.from_numpy(plan.positions).to(dev)
        keys = torch.arange(W, device=dev)
        mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (n, 1, T, W)
    logits = model(tokens, _layers(cache, fetch), pos=pos, mask=mask, last=last)
    return logits[:, 0]


def decode_rows(cache: slots.SlotCache, plan: slots.DecodePlan) -> torch.Tensor:
    """One token per row appended at its length; returns next-token logits (n, V)."""
    model, dev = cache.model, cache.keys[0].device
    tokens = torch.from_numpy(plan.tokens).to(dev)
    n, W = plan.n, plan.width
    mask = None
    if n and plan.uniform:  # the common case: views of the storage, cached
        layers, pos = _uniform_views(cache, n, W - 1), int(W - 1)
    else:
        pos_t = torch.from_numpy(plan.positions).to(dev)
        keys = torch.arange(W, device=dev)
        mask = (keys[None, :] <= pos_t[:, None])[:, None, None]  # (n, 1, 1, W)
        ar = torch.arange(len(plan.rows), device=dev)
        if n:
            layers = _ragged_views(cache, n, W, ar, pos_t)
        else:  # rows anywhere: gather them, write the new column into both
            rows = torch.from_numpy(plan.rows).to(dev)

            def fetch(K, V, k, v):
                Kr, Vr = K.index_select(0, rows)[:, :, :W], V.index_select(0, rows)[:, :, :W]
                Kr[ar, :, pos_t], Vr[ar, :, pos_t] = k[:, :, 0], v[:, :, 0]
                K[rows, :, pos_t], V[rows, :, pos_t] = k[:, :, 0], v[:, :, 0]
                return Kr, Vr

            layers = _layers(cache, fetch)
        pos = pos_t
    # one lean step per cache, not per model as MLX keeps its compiled steps: torch's training
    # updates the weights in place, so a model object's transposed copies could go stale
    step = cache.views.get("lean")
    if step is None:
        step = cache.views["lean"] = LeanStep(model)
    if step:
        return step(tokens, layers, pos, mask)
    # (a cache whose "lean" is False decodes through GPT.forward: the tests' reference)
    pos_in = torch.tensor([pos], device=dev) if isinstance(pos, int) else pos[:, None]
    return model(tokens[:, None], layers, pos=pos_in, mask=mask)[:, -1]


class _Views:
    """update_and_fetch over cached views: copy into the write views, return the read views."""

    __slots__ = ("kw", "vw", "kr", "vr")

    def __init__(self, kw, vw, kr, vr):
        self.kw, self.vw, self.kr, self.vr = kw, vw, kr, vr

    def update_and_fetch(self, k, v):
        self.kw.copy_(k)
        self.vw.copy_(v)
        return self.kr, self.vr


def _cached(cache: slots.SlotCache, key, make):
    views = cache.views
    got = views.get(key)
    if got is None:
        if len(views) > MAX_VIEWS:
            lean = views.get("lean")
            views.clear()
            if lean is not None:
                views["lean"] = lean
        got = views[key] = make()
    return got


def _uniform_views(cache: slots.SlotCache, n: int, col: int) -> list[_Views]:
    def make():
        return [
            _Views(
                K[:n, :, col : col + 1],
                V[:n, :, col : col + 1],
                K[:n, :, : col + 1],
                V[:n, :, : col + 1],
            )  # fmt: skip
            for K, V in zip(cache.keys, cache.values)
        ]

    return _cached(cache, ("u", n, col), make)


class _RaggedViews:
    """Rows 0..n-1 of different lengths: an indexed write, a view up to the longest row."""

    __slots__ = ("K", "V", "kr", "vr", "ar", "pos")

    def __init__(self, K, V, kr, vr, ar, pos):
        self.K, self.V, self.kr, self.vr, self.ar, self.pos = K, V, kr, vr, ar, pos

    def update_and_fetch(self, k, v):
        self.K[self.ar, :, self.pos] = k[:, :, 0]
        self.V[self.ar, :, self.pos] = v[:, :, 0]
        return self.kr, self.vr


def _ragged_views(cache, n: int, W: int, ar, pos_t) -> list[_RaggedViews]:
    reads = _cached(
        cache,
        ("r", n, W),
        lambda: [(K[:n, :, :W], V[:n, :, :W]) for K, V in zip(cache.keys, cache.values)],
    )
    return [
        _RaggedViews(K, V, kr, vr, ar, pos_t)
        for (K, V), (kr, vr) in zip(zip(cache.keys, cache.values), reads)
    ]


def copy_rows(cache: slots.SlotCache, src: np.ndarray, dst: np.ndarray, width: int) -> None:
    dev = cache.keys[0].device
    s, d = torch.from_numpy(src).to(dev), torch.from_numpy(dst).to(dev)
    for K, V in zip(cache.keys, cache.values):
        K[:, :, :width].index_copy_(0, d, K[:, :, :width].index_select(0, s))
        V[:, :, :width].index_copy_(0, d, V[:, :, :width].index_select(0, s))


# ---- the lean step ---------------------------------------------------------------------------


# a plain Linear's (W^T, bias) for addmm, or a prepared module (prepared.py) called as it is
Projection = tuple[torch.Tensor, torch.Tensor | None] | nn.Module


@dataclass
class _Weights:
    """One block's weights for `step`: LayerNorms as they are, projections as W^T (in, out)."""

    ln_1: tuple[torch.Tensor, torch.Tensor | None]
    c_attn: Projection
    c_proj: Projection
    ln_2: tuple[torch.Tensor, torch.Tensor | None]
    c_fc: Projection
    mlp_proj: Projection


# The transposed copies cost a second copy of every Linear weight: nothing at 0.8M parameters,
# but 340 MB next to GPT-2 124M's 500 MB of weights, where a batch-1 step is bound by reading
# the weights anyway and the (out, in) view reads them just as well. Above this many bytes of
# Linear weights the step uses views (no copy).
TRANSPOSE_COPY_MAX_BYTES = 32 << 20


def _transposer(linears: list[nn.Module]):
    """W^T as a contiguous copy for small models, a plain view for large ones; a prepared
    module as it is."""
    plain = [m for m in linears if type(m) is nn.Linear]
    copy = sum(m.weight.nbytes for m in plain) <= TRANSPOSE_COPY_MAX_BYTES

    def projection(m: nn.Module) -> Projection:
        if type(m) is not nn.Linear:
            return m
        return (m.weight.t().contiguous() if copy else m.weight.t()), m.bias

    return projection


class LeanStep:
    """`step(tokens, layers, pos, mask)` for one model: the weights read (and transposed) once
    per cache (a model that trains on gets a new cache, hence a new step)."""

    def __init__(self, model: GPT):
        tr = model.transformer
        self.spec = model.spec
        self.wpe, self.ln_f = tr.wpe.weight, (tr.ln_f.weight, tr.ln_f.bias)
        self.pe = self.wpe.unbind(0)  # one view per position row
        if isinstance(tr.wte, nn.Embedding):
            table, head = tr.wte.weight, tr.wte.weight.t()  # the tied head, (C, V)
            self.embed = lambda t: table.index_select(0, t)
            self.head = lambda x: torch.mm(x, head)
        else:  # prepared: its own lookup and head
            self.embed, self.head = tr.wte, tr.wte.as_linear
        _wt = _transposer(
            [m for b in tr.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        )
        self.layers = [
            _Weights(
                (b.ln_1.weight, b.ln_1.bias),
                _wt(b.attn.c_attn),
                _wt(b.attn.c_proj),
                (b.ln_2.weight, b.ln_2.bias),
                _wt(b.mlp.c_fc),
                _wt(b.mlp.c_proj),
            )
            for b in tr.h
        ]
        self.approximate = tr.h[0].mlp.approximate
        self._qkv: dict[int, tuple] = {}  # by batch size: the q/k/v buffer and its views

    def _buffers(self, B: int):
        got = self._qkv.get(B)
        if got is None:
            spec, w = self.spec, self.ln_f[0]  # LayerNorms carry the activations' dtype
            qkv = torch.empty(B, 3 * spec.n_embd, dtype=w.dtype, device=w.device)
            got = self._qkv[B] = (qkv, qkv.view(B, 3, spec.n_head, 1, spec.head_dim).unbind(1))
        return got

    def __call__(self, tokens: torch.Tensor, cache: list, pos, mask) -> torch.Tensor:
        """tokens (B,) at positions `pos` (an int shared by every row, or (B,)) -> next-token
        logits (B, V); each layer's keys and values through cache[l].update_and_fetch."""
        x = self.embed(tokens)  # (B, C)
        if isinstance(pos, int):
            x.add_(self.pe[pos])
        else:
            x.add_(self.wpe.index_select(0, pos))
        qkv, (q, k, v) = self._buffers(x.shape[0])
        C = (x.shape[1],)
        for layer, c in zip(self.layers, cache):
            h = torch.layer_norm(x, C, *layer.ln_1, LAYER_NORM_EPS)
            _linear(h, layer.c_attn, out=qkv)
            keys, values = c.update_and_fetch(k, v)  # (B, nh, L, hs)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, nh, 1, hs)
            _linear(y.view_as(x), layer.c_proj, out=x, residual=True)
            h = torch.layer_norm(x, C, *layer.ln_2, LAYER_NORM_EPS)
            h = F.gelu(_linear(h, layer.c_fc), approximate=self.approximate)
            _linear(h, layer.mlp_proj, out=x, residual=True)
        return self.head(torch.layer_norm(x, C, *self.ln_f, LAYER_NORM_EPS))


def _linear(x, proj: Projection, out=None, residual=False):
    """x @ W^T + b in one BLAS call (or the prepared module's kernel); into `out`, or added
    to it (the residual) in place."""
    if isinstance(proj, nn.Module):
        y = proj(x)
        if residual:
            return out.add_(y)
        return y if out is None else out.copy_(y)
    wt, b = proj
    if residual:
        out.addmm_(x, wt)
        return out if b is None else out.add_(b)
    if b is None:
        return torch.mm(x, wt, out=out)
    return torch.addmm(b, x, wt, out=out)
