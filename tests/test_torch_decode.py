"""torch's lean decode step on the slot cache against the one forward (GPT.forward)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polygpt.backends import get_backend  # noqa: E402
from polygpt.backends.torch_backend import decode, model  # noqa: E402
from polygpt.spec import ModelSpec  # noqa: E402

SPEC = ModelSpec(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)


@pytest.fixture(scope="module")
def gpt():
    m = model.GPT(SPEC)
    m.init_weights(torch.Generator().manual_seed(0))
    return m.eval()


@pytest.mark.parametrize("lengths", [[6, 6, 6], [6, 3, 1]], ids=["equal", "ragged"])
def test_lean_step_equals_the_forward(gpt, lengths):
    """Rows of equal lengths (views, no mask) and of different lengths (mask, indexed write),
    to the end of the block: the lean step's logits are GPT.forward's."""
    be = get_backend("torch", "cpu")
    g = np.random.default_rng(1)
    seq = g.integers(0, SPEC.vocab_size, (len(lengths), SPEC.block_size))
    lean, fwd = be.slot_cache(gpt, 3), be.slot_cache(gpt, 3)
    fwd.views["lean"] = False  # decode through GPT.forward
    for c in (lean, fwd):
        be.prefill_rows(c, [0, 1, 2], [seq[b, :n] for b, n in enumerate(lengths)])
    rows = np.arange(3)
    while lean.lengths.max() < SPEC.block_size:
        t = seq[rows, lean.lengths]
        a, b = be.decode_rows(lean, rows, t), be.decode_rows(fwd, rows, t)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert isinstance(lean.views["lean"], decode.LeanStep)
    full = be.logits(gpt, seq[:1])[0, -1]  # row 0 against the full forward of its tokens
    np.testing.assert_allclose(a[0], full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_models_decode_through_the_lean_step(precision):
    """A quantized model's lean step equals its own GPT.forward (the same prepared modules)."""
    be = get_backend("torch", "cpu")
    m = model.GPT(SPEC)
    m.init_weights(torch.Generator().manual_seed(0))
    q = be.set_precision(m.eval(), precision)
    lean, fwd = be.slot_cache(q, 2), be.slot_cache(q, 2)
    fwd.views["lean"] = False
    for c in (lean, fwd):
        be.prefill_rows(c, [0, 1], [[1, 2, 3], [4, 5]])
    a, b = be.decode_rows(lean, [0, 1], [6, 7]), be.decode_rows(fwd, [0, 1], [6, 7])
    assert isinstance(lean.views["lean"], decode.LeanStep)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
