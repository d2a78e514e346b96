"""torch's decode on the slot cache (the model's own forward on prepared weights and cached
views) against an independent computation: the cache-less full forward over each row's whole
sequence."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polygpt.backends import get_backend  # noqa: E402
from polygpt.backends.torch_backend import model, prepared  # noqa: E402
from polygpt.spec import ModelSpec  # noqa: E402

SPEC = ModelSpec(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)


@pytest.fixture(scope="module")
def gpt():
    m = model.GPT(SPEC)
    m.init_weights(torch.Generator().manual_seed(0))
    return m.eval()


def _full_last(be, m, seq: np.ndarray, lengths) -> np.ndarray:
    """Each row's next-token logits from the cache-less forward over its whole sequence."""
    return np.stack([be.logits(m, seq[b : b + 1, :n])[0, -1] for b, n in enumerate(lengths)])


@pytest.mark.parametrize("lengths", [[6, 6, 6], [6, 3, 1]], ids=["equal", "ragged"])
def test_decode_equals_the_full_forward(gpt, lengths):
    """Rows of equal lengths (views, no mask) and of different lengths (mask, indexed write),
    to the end of the block: every step's logits are those of the full forward over the
    row's sequence so far, without a cache."""
    be = get_backend("torch", "cpu")
    g = np.random.default_rng(1)
    seq = g.integers(0, SPEC.vocab_size, (len(lengths), SPEC.block_size))
    cache = be.slot_cache(gpt, 3)
    be.prefill_rows(cache, [0, 1, 2], [seq[b, :n] for b, n in enumerate(lengths)])
    rows = np.arange(3)
    while cache.lengths.max() < SPEC.block_size:
        t = seq[rows, cache.lengths]
        got = be.decode_rows(cache, rows, t)
        want = _full_last(be, gpt, seq, cache.lengths)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # the cache decodes with the prepared copy: small matrices stored transposed
    assert isinstance(cache.model.transformer.h[0].attn.c_attn, prepared.TransposedLinear)


def test_scattered_rows_decode_equals_the_full_forward(gpt):
    """Rows anywhere in the cache (gathered, written back by index) and a continuing
    prefill (the plan's scatter and mask) against the full forward."""
    be = get_backend("torch", "cpu")
    seq = np.random.default_rng(2).integers(0, SPEC.vocab_size, (4, SPEC.block_size))
    cache = be.slot_cache(gpt, 4)
    be.prefill_rows(cache, [0, 1, 2, 3], [seq[b, :n] for b, n in enumerate([5, 2, 7, 3])])
    got = be.prefill_rows(cache, [3, 1], [seq[3, 3:6], seq[1, 2:3]], starts=[3, 2])
    want = _full_last(be, gpt, seq[[3, 1]], [6, 3])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for _ in range(3):
        rows = np.array([2, 0, 3])
        got = be.decode_rows(cache, rows, seq[rows, cache.lengths[rows]])
        want = _full_last(be, gpt, seq[rows], cache.lengths[rows])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_models_decode_as_their_full_forward(precision):
    """A quantized model decodes through the same forward and its prepared modules: the
    logits equal its own cache-less forward's."""
    be = get_backend("torch", "cpu")
    m = model.GPT(SPEC)
    m.init_weights(torch.Generator().manual_seed(0))
    q = be.set_precision(m.eval(), precision)
    cache = be.slot_cache(q, 2)
    seq = np.array([[1, 2, 3, 6], [4, 5, 7, 0]])
    be.prefill_rows(cache, [0, 1], [[1, 2, 3], [4, 5]])
    got = be.decode_rows(cache, [0, 1], [6, 7])
    np.testing.assert_allclose(got, _full_last(be, q, seq, [4, 3]), rtol=0, atol=1e-4)
