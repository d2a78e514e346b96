"""Sampling rules, written once for every backend.

Small pure functions on NumPy logits (B, V), composed by `make_sampler` as in mlx-lm. The
random draw uses a seeded `numpy.random.Generator` and inverse-CDF sampling, never a framework
RNG, so the same seed picks the same tokens in torch and MLX (unless two cumulative
probabilities straddle the uniform draw within float error).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NEG_INF = -np.inf


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


def categorical(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row by inverse CDF from a backend-independent uniform."""
    probs = softmax(logits)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(logits.shape[0])[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1)


def make_sampler(
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")

    if temperature == 0:
        return lambda logits, rng: np.argmax(logits, axis=-1)

    def sample(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = apply_temperature(logits.astype(np.float64), temperature)
        x = apply_top_k(x, top_k)
        x = apply_top_p(x, top_p)
        return categorical(x, rng)

    return sample
