"""Generation on the slot cache in MLX: the row operations, and the decode step compiled.

`prefill_rows`, `decode_rows` and `copy_rows` (backends/slots.py has the bookkeeping) run
`GPT.__call__` with one `_Layer` per layer. The decode step over rows 0..n-1 (the engine keeps
its active rows there) is `GPT.__call__` itself under `mx.compile`: the new key and value are
scattered into the whole storage at (row, length) and attention runs over the first `width`
columns (a power of two covering the longest row) with the columns past each row's length
masked out (exactly zero weight), so the shapes depend on the lengths only through `width`,
the step is traced once per (n, width) for a model (one row: every allocated column), and
no Python runs per op. A small fresh prefill whose shape recurs (a server admitting short
prompts) is compiled the same way (`_hot_prefill`). LayerNorms, GELU, residual adds
and the mask fuse (the gain over the eager call: docs/BENCHMARKS.md, "Figures behind the
code"). Quantized models (nn.quantize) run the same step through their QuantizedLinear
layers. The step's outputs replace the storage arrays before anything is evaluated, so MLX
updates the storage in place (the inputs' last references are gone) rather than copying it.
The torch twin is backends/torch_backend/decode.py (there the eager forward on prepared
weights: torch.compile takes too long to start for sampling).
"""

from __future__ import annotations

import weakref

import mlx.core as mx
import numpy as np

from polygpt.backends import slots
from polygpt.backends.mlx_backend.model import GPT


class _Layer:
    """One layer's keys and values for one forward: `update_and_fetch(k, v)` stores the new
    keys and values (B, nh, T, hs) and returns those to attend to."""

    def __init__(self, fetch, keys: mx.array, values: mx.array):
        self.fetch, self.keys, self.values = fetch, keys, values

    def update_and_fetch(self, k: mx.array, v: mx.array):
        self.keys, self.values, kr, vr = self.fetch(self.keys, self.values, k, v)
        return kr, vr


def slot_cache(model: GPT, max_rows: int) -> slots.SlotCache:
    dtype = model.transformer.ln_f.weight.dtype  # LayerNorms are never quantized
    cache = slots.allocate_slot_cache(model, max_rows, lambda s: mx.zeros(s, dtype=dtype))
    mx.eval(cache.keys, cache.values)
    return cache


def _run(cache: slots.SlotCache, fetch, tokens, pos, mask, last=None) -> mx.array:
    layers = [_Layer(fetch, k, v) for k, v in zip(cache.keys, cache.values)]
    logits = cache.model(tokens, layers, pos=pos, mask=mask, last=last)
    cache.keys = [c.keys for c in layers]
    cache.values = [c.values for c in layers]
    return logits


def _ints(a: np.ndarray) -> mx.array:
    return mx.array(a.astype(np.int32))


def prefill_rows(cache: slots.SlotCache, plan: slots.PrefillPlan) -> mx.array:
    hot = _hot_prefill(cache, plan) if plan.fresh else None
    if hot is not None:  # a small prefill of a shape seen before: the compiled graph
        step, padded = hot
        rows, last = _ints(plan.rows), _ints(plan.last)
        logits, cache.keys, cache.values = step(padded, rows, last, cache.keys, cache.values)
        return logits
    rows, tokens, last = _ints(plan.rows), _ints(plan.tokens), _ints(plan.last)
    T = plan.width
    if plan.fresh:  # new keys only, plain causal: right padding follows every real query

        def fetch(K, V, k, v):
            K[rows, :, :T] = k
            V[rows, :, :T] = v
            return K, V, k, v

        pos, mask = mx.arange(T), None
    else:  # continuing rows: attend to their cached columns too
        W, sc = plan.keys, plan.scatter
        bi, tj, dst, cols = (_ints(a) for a in (sc.batch, sc.token, sc.rows, sc.cols))

        def fetch(K, V, k, v):
            kn, vn = k[bi, :, tj], v[bi, :, tj]  # the real tokens' keys (m, nh, hs)
            Kr, Vr = K[rows], V[rows]
            Kr[bi, :, cols] = kn
            Vr[bi, :, cols] = vn
            K[dst, :, cols] = kn
            V[dst, :, cols] = vn
            return K, V, Kr[:, :, :W], Vr[:, :, :W]

        pos, mask = _ints(plan.positions), mx.array(plan.mask)
    return _run(cache, fetch, tokens, pos, mask, last)[:, 0]


def decode_rows(cache: slots.SlotCache, plan: slots.DecodePlan) -> mx.array:
    tokens, pos = _ints(plan.tokens), _ints(plan.positions)
    if plan.n:  # rows 0..n-1: the compiled step over the columns the longest row needs
        cols = cache.capacity  # (the one-row step attends to every allocated column)
        width = cols if plan.n == 1 else attention_width(plan.width, cols)
        step = compiled_step(cache.model, width, plan.uniform)
        logits, cache.keys, cache.values = step(tokens, pos, cache.keys, cache.values)
        return logits
    rows, ar, W = _ints(plan.rows), _ints(plan.batch), plan.width

    def fetch(K, V, k, v):  # rows anywhere: gather them, write the new column into both
        Kr, Vr = K[rows][:, :, :W], V[rows][:, :, :W]
        Kr[ar, :, pos] = k[:, :, 0]
        Vr[ar, :, pos] = v[:, :, 0]
        K[rows, :, pos] = k[:, :, 0]
        V[rows, :, pos] = v[:, :, 0]
        return K, V, Kr, Vr

    mask = None if plan.mask is None else mx.array(plan.mask)
    return _run(cache, fetch, tokens[:, None], pos[:, None], mask)[:, -1]


# Compiled steps by model and shape, kept across caches (a server's, every `generate` call's):
# a trace costs as much as several decoded tokens of a small model, for each (rows, width). The
# model's weights are constants of a traced graph, so a step is traced again when the weights it
# saw were replaced (a model that trained on since).
_STEPS: dict[int, tuple[weakref.ref, dict[tuple, tuple[mx.array, object]]]] = {}


def _steps(model: GPT) -> dict[tuple, tuple[mx.array, object]]:
    key = id(model)
    entry = _STEPS.get(key)
    if entry is None or entry[0]() is not model:
        entry = _STEPS[key] = (weakref.ref(model, lambda _, k=key, d=_STEPS: d.pop(k, None)), {})
    return entry[1]


def _compiled(model: GPT, key: tuple, make_graph):
    steps = _steps(model)
    version = model.transformer.ln_f.weight  # a new array once the weights are updated (kept
    # by reference, not id: a freed array's id can be reused)
    got = steps.get(key)
    if got is None or got[0] is not version:
        got = steps[key] = (version, mx.compile(make_graph()))
    return got[1]


def compiled_step(model: GPT, width: int, uniform: bool):
    return _compiled(model, (width, uniform), lambda: _StepGraph(model, width, uniform))


# A fresh prefill of at most this many tokens (rows x the padded width) runs compiled once its
# shape has come HOT_PREFILLS times: such a prefill costs its ops' dispatch more than its
# arithmetic (docs/BENCHMARKS.md, "Figures behind the code"), and a server repeats a few shapes,
# while a one-off prefill (`polygpt sample`) would pay a trace for one call.
COMPILED_PREFILL_TOKENS = 256
HOT_PREFILLS = 3
_SEEN: dict[tuple[int, int], int] = {}  # fresh prefills by (rows, padded width)


def _hot_prefill(cache: slots.SlotCache, plan: slots.PrefillPlan):
    """The compiled prefill for this plan's shape and its tokens right-padded to a power-of-two
    width (one trace per (rows, width) pair, a handful per row count), or None: too big, or
    not yet seen HOT_PREFILLS times. Padding is harmless in a fresh prefill: it follows every
    real query under the causal mask, its keys land past the rows' lengths, never read."""
    n, T = plan.tokens.shape
    width = min(cache.capacity, 1 << (T - 1).bit_length())
    if n * width > COMPILED_PREFILL_TOKENS:
        return None
    shape = (n, width)
    seen = _SEEN[shape] = _SEEN.get(shape, 0) + 1
    if seen < HOT_PREFILLS:
        return None
    tokens = np.zeros(shape, dtype=np.int32)
    tokens[:, :T] = plan.tokens
    step = _compiled(cache.model, ("prefill", width), lambda: _PrefillGraph(cache.model))
    return step, mx.array(tokens)


def attention_width(width: int, block: int) -> int:
    """The columns a compiled step attends to: the next power of two >= width (at least 32),
    so a batch of short rows does not attend over the whole block, and a step is traced once
    per (rows, width) pair, a handful per batch size."""
    return min(block, max(32, 1 << (width - 1).bit_length()))


class _StepGraph:
    """The function mx.compile traces: one token for rows 0..n-1, written into the whole
    storage, attending to the first `width` columns. `uniform`: every row is at the same
    column, written with one slice update (a scatter per row costs more: docs/BENCHMARKS.md,
    "Figures behind the code")."""

    def __init__(self, model: GPT, width: int, uniform: bool):
        # the model's weights are constants of the compiled graph (see compiled_step)
        self.model, self.width, self.uniform = model, width, uniform

    def __call__(self, tokens, pos, keys, values):
        n = tokens.shape[0]
        ar = mx.arange(n)

        w = self.width
        start = mx.concatenate([mx.zeros((1,), dtype=pos.dtype), pos[:1]])  # (row 0, column)

        def fetch(K, V, k, v):
            if self.uniform:
                K = mx.slice_update(K, k, start, axes=(0, 2))
                V = mx.slice_update(V, v, start, axes=(0, 2))
            else:
                K[ar, :, pos] = k[:, :, 0]
                V[ar, :, pos] = v[:, :, 0]
            return K, V, K[:n, :, :w], V[:n, :, :w]

        layers = [_Layer(fetch, k, v) for k, v in zip(keys, values)]
        # the mask is made in the graph from `pos`, not taken from the plan: it spans the
        # padded `width` (one trace per width), and made here it fuses into the step
        mask = (mx.arange(w)[None, :] <= pos[:, None])[:, None, None]  # (n, 1, 1, width)
        logits = self.model(tokens[:, None], layers, pos=pos[:, None], mask=mask)[:, -1]
        return logits, [c.keys for c in layers], [c.values for c in layers]


class _PrefillGraph:
    """The function mx.compile traces for a fresh prefill: right-padded tokens (n, T) written at
    columns 0..T-1 of `rows` in the whole storage, attending causally to the new keys only;
    the logits after each row's `last` token. (mx.compile traces it once per shape.)"""

    def __init__(self, model: GPT):
        self.model = model  # its weights are constants of the compiled graph (see _compiled)

    def __call__(self, tokens, rows, last, keys, values):
        T = tokens.shape[1]

        def fetch(K, V, k, v):
            K[rows, :, :T] = k
            V[rows, :, :T] = v
            return K, V, k, v

        layers = [_Layer(fetch, k, v) for k, v in zip(keys, values)]
        logits = self.model(tokens, layers, pos=mx.arange(T), mask=None, last=last)[:, 0]
        return logits, [c.keys for c in layers], [c.values for c in layers]


def grow(cache: slots.SlotCache, columns: int) -> None:
    """The storage re-made `columns` wide, the old columns copied in."""
    for arrays in (cache.keys, cache.values):
        for i, a in enumerate(arrays):
            pad = slots.growth_shape(cache.spec, cache.max_rows, columns - a.shape[2])
            arrays[i] = mx.concatenate([a, mx.zeros(pad, dtype=a.dtype)], axis=2)
            mx.eval(arrays[i])  # one layer at a time: the old array is freed as we go


def copy_rows(cache: slots.SlotCache, src: np.ndarray, dst: np.ndarray, width: int) -> None:
    s, d = _ints(src), _ints(dst)
    for arrays in (cache.keys, cache.values):
        for i, a in enumerate(arrays):
            a[d, :, :width] = a[s, :, :width]
            arrays[i] = a
    mx.eval(cache.keys, cache.values)
