"""The slot cache's bookkeeping and row plans for generation, shared by both backends: a
backend supplies only the framework calls (einops' backends, keras's `backend/common`).

The slot cache (llama.cpp's slots, vLLM's persistent batch): per layer one K and one V array of
shape (max_rows, n_head, block_size, head_dim), allocated once, and one length per row. Every
row starts at column 0 and owns its whole block, so a token's position id is its column and no
row's position depends on another's. The backends hold the arrays and run the model; this module
turns the rows' requests into index arrays (NumPy, token data only), validates them and keeps
the lengths, so the rule "row r attends to columns 0..length[r]" is written once.

Three row operations, the same in torch and MLX:
- `prefill_rows(cache, rows, tokens, starts)`: right-padded token lists, written at columns
  start .. start + len - 1 of their rows; returns the logits after each row's last token.
- `decode_rows(cache, rows, tokens)`: one token per row at column length[row].
- `copy_rows(cache, src, dst)`: a row's keys, values and length copied onto another (a batch
  compacted when a row leaves; n choices of one prompt sharing one prefill).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from polygpt.spec import ModelSpec

GROW_COLUMNS = 256  # storage columns allocated at a time (see SlotCache)


class SlotCache:
    """K/V arrays of every layer for `max_rows` rows (framework arrays, owned by the backend)
    and each row's length: how many columns of the row hold keys and values.

    The arrays hold `capacity` columns, grown GROW_COLUMNS at a time as the longest row needs
    them (`columns_for`), up to the block: a short generation with a long block does not
    hold a whole block of keys per row."""

    def __init__(self, model: Any, spec: ModelSpec, max_rows: int, keys: list, values: list):
        if max_rows < 1:
            raise ValueError("a slot cache needs at least one row")
        self.model, self.spec, self.max_rows = model, spec, max_rows
        self.keys, self.values = keys, values  # per layer (max_rows, n_head, capacity, head_dim)
        self.lengths = np.zeros(max_rows, dtype=np.int64)
        self.views: dict = {}  # backend-private: views/compiled steps keyed by shape

    @property
    def block(self) -> int:
        return self.spec.block_size

    @property
    def capacity(self) -> int:
        """Columns the arrays hold now (<= block; a cache without arrays, a test's mock: the
        block)."""
        return int(self.keys[0].shape[2]) if self.keys else self.block

    def columns_for(self, needed: int) -> int:
        """The capacity that holds `needed` columns: whole GROW_COLUMNS, at most the block."""
        return min(self.block, -(-needed // GROW_COLUMNS) * GROW_COLUMNS)

    def reset(self, rows) -> None:
        """Empty rows (their columns are overwritten by whatever comes next)."""
        self.lengths[_rows(self, rows)] = 0


def _rows(cache: SlotCache, rows: Sequence[int] | np.ndarray, unique: bool = True) -> np.ndarray:
    r = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(r) == 0:
        raise ValueError("no rows given")
    if r.min() < 0 or r.max() >= cache.max_rows:
        raise ValueError(f"rows must be in 0..{cache.max_rows - 1}")
    increasing = len(r) == 1 or bool(np.all(r[1:] > r[:-1]))  # (the engine's: no sort)
    if unique and not increasing and len(np.unique(r)) != len(r):
        raise ValueError("a row is given twice")
    return r


def prefix_length(rows: np.ndarray) -> int:
    """n when rows are exactly 0..n-1 (views of the storage serve them), else 0."""
    n = len(rows)
    if rows[0] != 0 or rows[-1] != n - 1:
        return 0
    return n if n < 3 or bool(np.all(rows[1:] > rows[:-1])) else 0


@dataclass
class Scatter:
    """Where a continuing prefill's real tokens go: token (batch[m], token[m]) of the forward
    is written at column cols[m] of cache row rows[m] (and of the gathered rows' copy, at
    batch[m]). Padding is never written."""

    batch: np.ndarray
    token: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


@dataclass
class PrefillPlan:
    """Right-padded tokens of a prefill and where they go.

    tokens (n, T): row i's tokens then zeros; positions (n, T): start + j, clipped into the
    block for padding; last (n,): index of each row's last token; fresh: every start is 0
    (attention needs only the new keys, with a causal mask: right padding comes after every
    real query); valid (n, T): which entries are real tokens. A continuing (not fresh) prefill
    also attends to its rows' cached columns: `mask` (n, 1, T, keys) bool, True = attend (column
    c <= the query's position), and `scatter` says where its keys go."""

    rows: np.ndarray
    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    positions: np.ndarray
    last: np.ndarray
    valid: np.ndarray
    fresh: bool
    mask: np.ndarray | None = None
    scatter: Scatter | None = None

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def keys(self) -> int:
        """Columns the longest row holds after this prefill (what a continuing one reads)."""
        return int(self.ends().max())

    def ends(self) -> np.ndarray:
        """Columns 0..end-1 of row i hold keys after this prefill."""
        return self.starts + self.lengths


def plan_prefill(
    cache: SlotCache,
    rows: Sequence[int] | np.ndarray,
    tokens: Sequence[Sequence[int]] | np.ndarray,
    starts: Sequence[int] | np.ndarray | None = None,
) -> PrefillPlan:
    r = _rows(cache, rows)
    seqs = [np.asarray(t, dtype=np.int64).reshape(-1) for t in tokens]
    if len(seqs) != len(r):
        raise ValueError("prefill_rows needs one token list per row")
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if lengths.min() < 1:
        raise ValueError("prefill_rows needs at least one token per row")
    s = np.zeros(len(r), dtype=np.int64) if starts is None else np.asarray(starts, np.int64)
    if s.shape != r.shape or s.min() < 0:
        raise ValueError("starts needs one non-negative column per row")
    if np.any(s > cache.lengths[r]):
        raise ValueError("a prefill may not start past a row's length (a gap of no keys)")
    if np.any(s + lengths > cache.block):
        raise ValueError(f"a row would exceed the block ({cache.block} columns)")
    T = int(lengths.max())
    out = np.zeros((len(r), T), dtype=np.int64)
    j = np.arange(T)
    valid = j[None, :] < lengths[:, None]
    for i, q in enumerate(seqs):
        out[i, : len(q)] = q
    positions = np.minimum(s[:, None] + j[None, :], cache.block - 1)
    plan = PrefillPlan(r, out, s, lengths, positions, lengths - 1, valid, not s.any())
    if not plan.fresh:
        plan.mask = attention_mask(positions, plan.keys)[:, None]  # (n, 1, T, keys)
        bi, tj = np.nonzero(valid)
        plan.scatter = Scatter(bi, tj, r[bi], s[bi] + tj)
    return plan


def attention_mask(positions: np.ndarray, width: int) -> np.ndarray:
    """positions (...) -> bool (..., width): column c is attended from position p when c <= p
    (a row's own keys up to its query; columns past a row's length are never read)."""
    return np.arange(width) <= positions[..., None]


def commit_prefill(cache: SlotCache, plan: PrefillPlan) -> None:
    cache.lengths[plan.rows] = plan.ends()


@dataclass
class DecodePlan:
    """One token per row: written at column positions[i] = the row's length, which attends to
    columns 0..positions[i]. `n`: rows are 0..n-1 (else 0); `uniform`: every row is equally
    long (no mask needed over the first `width` columns)."""

    rows: np.ndarray
    tokens: np.ndarray
    positions: np.ndarray
    n: int
    uniform: bool
    width: int  # columns any row attends to: max position + 1

    @functools.cached_property
    def mask(self) -> np.ndarray | None:
        """(n, 1, 1, width) bool, True = attend; None for uniform rows (they attend to every
        column of `width`). Made when first read: MLX's compiled step masks inside its graph."""
        if self.uniform:
            return None
        return attention_mask(self.positions, self.width)[:, None, None]

    @property
    def batch(self) -> np.ndarray:
        """0..len(rows)-1: each row's index in the step's batch."""
        return np.arange(len(self.rows))


def plan_decode(cache: SlotCache, rows, tokens) -> DecodePlan:
    """`rows`: row indices, or range(n) for rows 0..n-1 (the engine's: checked in O(1))."""
    if isinstance(rows, range) and rows.start == 0 and rows.step == 1:
        if not 0 < rows.stop <= cache.max_rows:
            raise ValueError(f"rows must be in 0..{cache.max_rows - 1}")
        n = rows.stop
        r, pos = _arange(n), cache.lengths[:n].copy()
    else:
        r = _rows(cache, rows)
        n, pos = prefix_length(r), cache.lengths[r]
    t = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if t.shape != r.shape:
        raise ValueError("decode_rows needs one token per row")
    low, high = pos.min(), pos.max()
    if high >= cache.block:
        raise ValueError("a row's block is full: slide its window first")
    return DecodePlan(r, t, pos, n, bool(low == high), int(high) + 1)


def _arange(n: int, _cache: dict[int, np.ndarray] = {}) -> np.ndarray:  # noqa: B006 - a memo
    got = _cache.get(n)
    if got is None:
        got = _cache[n] = np.arange(n, dtype=np.int64)
        got.flags.writeable = False
    return got


def commit_decode(cache: SlotCache, plan: DecodePlan) -> None:
    if plan.n:
        cache.lengths[: plan.n] = plan.positions + 1
    else:
        cache.lengths[plan.rows] = plan.positions + 1


def plan_copy(cache: SlotCache, src, dst) -> tuple[np.ndarray, np.ndarray, int]:
    """Source and destination rows and the columns worth copying (the longest source)."""
    s, d = _rows(cache, src, unique=False), _rows(cache, dst)  # a row may go to several
    if s.shape != d.shape:
        raise ValueError("copy_rows needs as many destinations as sources")
    return s, d, int(cache.lengths[s].max())


def commit_copy(cache: SlotCache, src: np.ndarray, dst: np.ndarray) -> None:
    cache.lengths[dst] = cache.lengths[src]


class SlotOps:
    """The row operations of the Backend protocol, written once: plan, run, then commit the
    new lengths (a failed forward leaves the lengths as they were). A backend supplies
    `_new_slot_cache`, `_prefill` and `_decode` (a plan in, logits (n, V) float32 NumPy out),
    `_copy`, and `_grow` (the arrays re-made with more columns, the old ones copied in)."""

    def slot_cache(self, model: Any, max_rows: int) -> SlotCache:
        """An empty slot cache for `model` with `max_rows` rows (allocated once)."""
        return self._new_slot_cache(model, max_rows)

    def prefill_rows(self, cache: SlotCache, rows, tokens, starts=None) -> np.ndarray:
        """Write each row's tokens at columns start.. (default 0: a fresh window); returns
        the logits after each row's last token (n, V) float32."""
        plan = plan_prefill(cache, rows, tokens, starts)
        self._fit(cache, plan.keys)
        logits = self._prefill(cache, plan)
        commit_prefill(cache, plan)
        return logits

    def decode_rows(self, cache: SlotCache, rows, tokens) -> np.ndarray:
        """Append one token per row at its length; returns next-token logits (n, V)."""
        plan = plan_decode(cache, rows, tokens)
        self._fit(cache, plan.width)
        logits = self._decode(cache, plan)
        commit_decode(cache, plan)
        return logits

    def _fit(self, cache: SlotCache, columns: int) -> None:
        if columns > cache.capacity:
            self._grow(cache, cache.columns_for(columns))

    def copy_rows(self, cache: SlotCache, src, dst) -> None:
        """Row dst[i] becomes a copy of row src[i] (keys, values, length)."""
        s, d, width = plan_copy(cache, src, dst)
        if width:
            self._copy(cache, s, d, width)
        commit_copy(cache, s, d)


def allocate_slot_cache(model: Any, max_rows: int, zeros: Callable[[tuple], Any]) -> SlotCache:
    """A slot cache of zeroed K/V arrays from the framework's `zeros(shape)` (zeros, not
    garbage, since a step may attend over masked columns and NaN * 0 is NaN), GROW_COLUMNS
    wide or the whole block if that is less."""
    spec = model.spec
    shape = growth_shape(spec, max_rows, min(spec.block_size, GROW_COLUMNS))
    keys = [zeros(shape) for _ in range(spec.n_layer)]
    values = [zeros(shape) for _ in range(spec.n_layer)]
    return SlotCache(model, spec, max_rows, keys, values)


def growth_shape(spec: ModelSpec, max_rows: int, columns: int) -> tuple[int, int, int, int]:
    """The shape of one layer's K (or V) array at `columns` columns."""
    return (max_rows, spec.n_head, columns, spec.head_dim)
