"""Sampling rules, written once for every backend.

Small pure functions on NumPy logits (B, V), composed by `make_sampler` as in mlx-lm, each
unit-tested on hand-built distributions. The random draw is inverse-CDF sampling from a uniform
number that comes from a seeded NumPy generator, never from a framework RNG, so the same seed
picks the same tokens in torch and MLX (unless two cumulative probabilities straddle the uniform
within float error).

Random streams: every row of a batch has its own generator, seeded from (seed, row), and takes
exactly one uniform per decoding step. A row's tokens therefore do not depend on what else is
in the batch: sampling 8 prompts as one batch gives the same text as sampling them one by one
(row b alone is seeded (seed, b) too, see `RowStreams(seed, rows=[b])`). One generator shared by
the batch would hand row b a different uniform depending on the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

NEG_INF = -np.inf

Sampler = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return logits / temperature


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits of each row (ties at the k-th value are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[..., -k, None]
    return np.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p.

    The most likely token is always kept."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(sorted_logits)
    cum = np.cumsum(probs, axis=-1)
    drop_sorted = (cum - probs) >= p  # tokens whose predecessors already reach p
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, NEG_INF, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - np.max(logits, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def categorical(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse CDF: row b draws the first token whose cumulative probability exceeds u[b].

    `u` holds one uniform in [0, 1) per row. Tokens of probability 0 (filtered to -inf) can
    never be drawn: their cumulative sum equals their predecessor's."""
    return _draw(np.array(logits, dtype=np.float64), u)


def _draw(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """categorical() in place on float64 logits x (this runs once per generated token)."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)  # unnormalized probabilities
    np.cumsum(x, axis=-1, out=x)
    idx = (x <= (u * x[:, -1])[:, None]).sum(axis=-1)
    return np.minimum(idx, x.shape[-1] - 1, out=idx)


def make_sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
    """A function (logits (B, V), uniforms (B,) or None) -> next token ids (B,).

    temperature 0 is greedy (argmax, first index on ties) and needs no uniforms. Filters apply
    in the order temperature, top-k, top-p (as Hugging Face's), all in float64."""
    check_settings(temperature, top_k, top_p)
    if temperature == 0:
        return lambda logits, u=None: np.argmax(logits, axis=-1)

    def sample(logits: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        x = apply_temperature(logits.astype(np.float64), temperature)
        x = apply_top_k(x, top_k)
        x = apply_top_p(x, top_p)
        return categorical(x, u)

    def sample_plain(logits: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        x = logits.astype(np.float64)
        x /= temperature
        return _draw(x, u)

    if top_k == 0 and top_p == 1.0:  # the common case: one copy, no filters
        return sample_plain

    return sample


def sample_rows(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    u: np.ndarray,
) -> np.ndarray:
    """Next tokens (B,) for rows with their own settings (arrays of B): row b gets exactly
    what `make_sampler(temperature[b], top_k[b], top_p[b])` gives it alone, float op for float
    op, so a row's text does not depend on its neighbours' settings. `u` (B,): each row's
    uniform (ignored for greedy rows). Rows are sampled in groups: greedy ones, unfiltered
    ones (one vectorized draw) and one group per (top_k, top_p) pair."""
    out = np.empty(len(logits), dtype=np.int64)
    greedy = temperature == 0
    if greedy.any():
        out[greedy] = np.argmax(logits[greedy], axis=-1)
    plain = ~greedy & (top_k == 0) & (top_p == 1.0)
    if plain.any():
        x = logits[plain].astype(np.float64)
        x /= temperature[plain][:, None]
        out[plain] = _draw(x, u[plain])
    rest = np.flatnonzero(~greedy & ~plain)
    for k, p in sorted({(int(top_k[i]), float(top_p[i])) for i in rest}):
        idx = rest[(top_k[rest] == k) & (top_p[rest] == p)]
        x = apply_temperature(logits[idx].astype(np.float64), temperature[idx][:, None])
        out[idx] = categorical(apply_top_p(apply_top_k(x, k), p), u[idx])
    return out


class BadSetting(ValueError):
    """A sampler setting out of range; `name` says which (a server's error names it)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def check_settings(temperature: float, top_k: int, top_p: float) -> None:
    """BadSetting for settings no sampler takes: the one place they are checked."""
    if not temperature >= 0:  # NaN too
        raise BadSetting("temperature", "temperature must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise BadSetting("top_p", "top_p must be in (0, 1]")
    if top_k < 0:
        raise BadSetting("top_k", "top_k must be >= 0")


class RowStreams:
    """One seeded uniform stream per row: row b's generator is seeded from (seed, b).

    `next()` returns the next uniform of every row (one per decoding step). Uniforms are drawn
    in chunks (a numpy Generator yields the same doubles in chunks as one at a time), so the
    per-token cost is one column read.
    """

    def __init__(self, seed: int, rows: int | Sequence[int], chunk: int = 256):
        ids = range(rows) if isinstance(rows, int) else rows
        self._gens = [np.random.default_rng([seed, int(r)]) for r in ids]
        self._chunk = chunk
        self._buf = np.empty((len(self._gens), 0))
        self._i = 0

    def next(self) -> np.ndarray:
        if self._i == self._buf.shape[1]:
            self._buf = np.stack([g.random(self._chunk) for g in self._gens])
            self._i = 0
        u = self._buf[:, self._i]
        self._i += 1
        return u
