"""Generation on the slot cache in torch: the row operations, as framework calls only.

`prefill_rows`, `decode_rows` and `copy_rows` turn a plan (backends/slots.py: tokens, position
ids, masks and index arrays, in NumPy) into tensors and run the model's own forward,
`model(tokens, cache, pos=..., mask=...)`, with one `update_and_fetch` writer per layer. The
model the engine decodes with is prepared (prepared.for_generation: packed, transposed or
quantized matrices), so a decode step is that forward on weights in the form its kernels want.

Views. A decode step reads rows 0..n-1 up to the longest row's column, and writes one column:
both are views of the storage, made once per (n, column) and kept (`cache.views`) with the
column's position id, so a step makes no view-making calls; rows of different lengths add the
plan's mask and one indexed write.
"""

from __future__ import annotations

import numpy as np
import torch

from polygpt.backends import slots
from polygpt.backends.torch_backend.model import GPT

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


def _tensor(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t if dev.type == "cpu" else t.to(dev)


def prefill_rows(cache: slots.SlotCache, plan: slots.PrefillPlan) -> torch.Tensor:
    """Run a prefill plan; returns the logits after each row's last token (n, V)."""
    dev = cache.keys[0].device
    rows, tokens, last = (_tensor(a, dev) for a in (plan.rows, plan.tokens, plan.last))
    T = plan.width
    if plan.fresh:  # new keys only, plain causal: right padding follows every real query

        def fetch(K, V, k, v):
            K[:, :, :T].index_copy_(0, rows, k)
            V[:, :, :T].index_copy_(0, rows, v)
            return k, v

        pos, mask = torch.arange(T, device=dev), None
    else:  # continuing rows: attend to their cached columns too
        W, sc = plan.keys, plan.scatter
        bi, tj, dst, cols = (_tensor(a, dev) for a in (sc.batch, sc.token, sc.rows, sc.cols))

        def fetch(K, V, k, v):
            Kr, Vr = K.index_select(0, rows)[:, :, :W], V.index_select(0, rows)[:, :, :W]
            kn, vn = k[bi, :, tj], v[bi, :, tj]  # the real tokens' keys (m, nh, hs)
            Kr[bi, :, cols], Vr[bi, :, cols] = kn, vn
            K[dst, :, cols], V[dst, :, cols] = kn, vn
            return Kr, Vr

        pos, mask = _tensor(plan.positions, dev), _tensor(plan.mask, dev)
    logits = cache.model.forward(tokens, _layers(cache, fetch), pos=pos, mask=mask, last=last)
    return logits[:, 0]


def decode_rows(cache: slots.SlotCache, plan: slots.DecodePlan) -> torch.Tensor:
    """One token per row appended at its length; returns next-token logits (n, V)."""
    dev = cache.keys[0].device
    tokens = _tensor(plan.tokens[:, None], dev)  # (n, 1)
    n, W = plan.n, plan.width
    if n and plan.uniform:  # the common case: views of the storage, cached
        layers, pos = _uniform_views(cache, n, W - 1)
        mask = None
    else:
        pos, mask = _tensor(plan.positions, dev), _tensor(plan.mask, dev)
        batch = _tensor(plan.batch, dev)
        if n:
            layers = _ragged_views(cache, n, W, batch, pos)
        else:
            layers = _gathered(cache, _tensor(plan.rows, dev), W, batch, pos)
        pos = pos[:, None]  # (n, 1)
    return cache.model.forward(tokens, layers, pos=pos, mask=mask)[:, -1]


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
            views.clear()
        got = views[key] = make()
    return got


def _uniform_views(cache: slots.SlotCache, n: int, col: int) -> tuple[list[_Views], torch.Tensor]:
    """Rows 0..n-1 all at column `col`: each layer's write and read views, and the position."""

    def make():
        layers = [
            _Views(
                K[:n, :, col : col + 1],
                V[:n, :, col : col + 1],
                K[:n, :, : col + 1],
                V[:n, :, : col + 1],
            )  # fmt: skip
            for K, V in zip(cache.keys, cache.values)
        ]
        return layers, torch.tensor([col], device=cache.keys[0].device)

    return _cached(cache, ("u", n, col), make)


class _RaggedViews:
    """Rows 0..n-1 of different lengths: an indexed write, a view up to the longest row."""

    __slots__ = ("K", "V", "kr", "vr", "batch", "pos")

    def __init__(self, K, V, kr, vr, batch, pos):
        self.K, self.V, self.kr, self.vr, self.batch, self.pos = K, V, kr, vr, batch, pos

    def update_and_fetch(self, k, v):
        self.K[self.batch, :, self.pos] = k[:, :, 0]
        self.V[self.batch, :, self.pos] = v[:, :, 0]
        return self.kr, self.vr


def _ragged_views(cache, n: int, W: int, batch, pos) -> list[_RaggedViews]:
    reads = _cached(
        cache,
        ("r", n, W),
        lambda: [(K[:n, :, :W], V[:n, :, :W]) for K, V in zip(cache.keys, cache.values)],
    )
    return [
        _RaggedViews(K, V, kr, vr, batch, pos)
        for (K, V), (kr, vr) in zip(zip(cache.keys, cache.values), reads)
    ]


def _gathered(cache, rows, W: int, batch, pos) -> list[_Layer]:
    """Rows anywhere: gather them, write the new column into the gathered copy and the cache."""

    def fetch(K, V, k, v):
        Kr, Vr = K.index_select(0, rows)[:, :, :W], V.index_select(0, rows)[:, :, :W]
        Kr[batch, :, pos], Vr[batch, :, pos] = k[:, :, 0], v[:, :, 0]
        K[rows, :, pos], V[rows, :, pos] = k[:, :, 0], v[:, :, 0]
        return Kr, Vr

    return _layers(cache, fetch)


def grow(cache: slots.SlotCache, columns: int) -> None:
    """The storage re-made `columns` wide, the old columns copied in (the views are of the old
    storage: dropped)."""
    for arrays in (cache.keys, cache.values):
        for i, a in enumerate(arrays):
            new = a.new_zeros(slots.growth_shape(cache.spec, cache.max_rows, columns))
            new[:, :, : a.shape[2]] = a
            arrays[i] = new
    cache.views.clear()


def copy_rows(cache: slots.SlotCache, src: np.ndarray, dst: np.ndarray, width: int) -> None:
    dev = cache.keys[0].device
    s, d = _tensor(src, dev), _tensor(dst, dev)
    for K, V in zip(cache.keys, cache.values):
        K[:, :, :width].index_copy_(0, d, K[:, :, :width].index_select(0, s))
        V[:, :, :width].index_copy_(0, d, V[:, :, :width].index_select(0, s))
