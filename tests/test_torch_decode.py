"""torch's lean decode step and the per-layer KV cache against the one forward."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polygpt.backends import backend_class, get_backend, known_backends  # noqa: E402
from polygpt.backends.torch_backend import decode, model  # noqa: E402
from polygpt.spec import ModelSpec  # noqa: E402

SPEC = ModelSpec(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)


@pytest.fixture(scope="module")
def gpt():
    m = model.GPT(SPEC)
    m.init_weights(torch.Generator().manual_seed(0))
    return m.eval()


@pytest.mark.parametrize("pad", [[0, 0, 0], [0, 3, 5]])
@torch.inference_mode()
def test_lean_step_equals_the_forward_and_the_full_forward(gpt, pad):
    B, T0 = len(pad), 6
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, SPEC.vocab_size, (B, SPEC.block_size), generator=g)
    pad_t = torch.tensor(pad) if any(pad) else None
    lean_cache = model.make_cache(SPEC, B, pad_t)
    fwd_cache = model.make_cache(SPEC, B, pad_t)
    gpt(seq[:, :T0], lean_cache)
    gpt(seq[:, :T0], fwd_cache)
    step = decode.LeanStep(gpt, lean_cache)
    for t in range(T0, SPEC.block_size):
        lean = step(seq[:, t])
        fwd = gpt(seq[:, t : t + 1], fwd_cache)[:, -1]
        torch.testing.assert_close(lean, fwd, rtol=0, atol=1e-5)
    # the unpadded rows against a full forward of their window (no cache)
    full = gpt(seq)[:, -1]
    for b, p in enumerate(pad):
        if p == 0:
            torch.testing.assert_close(lean[b], full[b], rtol=0, atol=1e-5)
    assert lean_cache[0].offset == SPEC.block_size
    with pytest.raises(RuntimeError, match="full"):
        step(seq[:, 0])


@torch.inference_mode()
def test_a_reused_cache_starts_empty_with_new_padding(gpt):
    first = model.make_cache(SPEC, 2)
    gpt(torch.zeros(2, 4, dtype=torch.long), first)
    again = model.make_cache(SPEC, 2, torch.tensor([1, 0]), reuse=first)
    assert again is first and again[0].offset == 0 and again[1].rows.valid is not None
    other = model.make_cache(SPEC, 3, reuse=first)  # another batch size: new buffers
    assert other is not first


def test_int8_models_decode_through_the_forward(gpt):
    be = get_backend("torch", "cpu")
    q = be.set_precision(model.GPT(SPEC).eval(), "int8")
    assert decode.supports(gpt) and not decode.supports(q)
    gen, _ = be.prefill(q, np.zeros((1, 3), dtype=np.int64), np.zeros(1, dtype=np.int64))
    assert gen.step is None and be.decode(q, gen, np.zeros(1, dtype=np.int64)).shape == (1, 50)


@pytest.mark.parametrize("name", known_backends())
def test_backend_facts(name):
    try:
        cls = backend_class(name)
    except Exception as e:  # noqa: BLE001 - a missing framework
        pytest.skip(str(e))
    assert cls.devices[0] == "cpu" and set(cls.train_dtypes) <= set(cls.precisions)
    be = cls("cpu")
    assert set(be.device_precisions("cpu")) <= set(cls.precisions) and "fp32" in cls.precisions
    assert isinstance(cls.native_quantized, bool)
