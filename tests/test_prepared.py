"""torch's prepared inference weights (packed fp32/bf16, int8, int4): the decode step on them
gives the plain forward's logits within the precision's tolerance, at 1 and 16 rows, and a
model that trains on is never decoded with weights prepared before the step."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polygpt import inference, modelfile, quantized, tensorfile  # noqa: E402
from polygpt.backends import get_backend  # noqa: E402
from polygpt.backends.torch_backend import prepared  # noqa: E402
from polygpt.config import TrainConfig  # noqa: E402
from polygpt.spec import ModelSpec  # noqa: E402

from .test_lean_load import LiveBytes  # noqa: E402
from .test_quantize import LOGIT_TOL  # noqa: E402

SPEC = ModelSpec(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=True)
PROMPT = 12


@pytest.fixture(autouse=True)
def pack_everything(monkeypatch):
    """Pack matrices of any size, so the tiny model takes the GPT-2-sized path."""
    monkeypatch.setattr(prepared, "PACK_MIN_BYTES", 0)


def _decode_logits(be, model, prompts: np.ndarray) -> np.ndarray:
    """Each row's prompt prefilled but its last token, which one decode step of all rows
    takes: the logits after the whole prompt (rows, V)."""
    n = len(prompts)
    cache = be.slot_cache(model, n)
    be.prefill_rows(cache, list(range(n)), [p[:-1] for p in prompts])
    return be.decode_rows(cache, np.arange(n), prompts[:, -1])


def _train_step(be, model) -> None:
    opt = be.make_optimizer(model, TrainConfig(lr=3e-2, threads=1))
    g = np.random.default_rng(0)
    x = g.integers(0, SPEC.vocab_size, (4, SPEC.block_size))
    be.train_step(model, opt, [(x, np.roll(x, -1, axis=1))], lr=3e-2, grad_clip=1.0)


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_prepared_decode_equals_the_plain_forward_after_a_training_step(precision, rows):
    be = get_backend("torch", "cpu")
    model = be.init_model(SPEC, 0)
    prompts = np.random.default_rng(rows).integers(0, SPEC.vocab_size, (rows, PROMPT))
    before = _decode_logits(be, model, prompts)  # prepares the weights as they are now
    _train_step(be, model)
    ref = be.logits(model, prompts)[:, -1]  # the plain forward on the trained weights
    assert np.abs(before - ref).max() > 100 * LOGIT_TOL["fp32"]  # the step moved the logits

    target = model if precision == "fp32" else be.set_precision(copy.deepcopy(model), precision)
    got = _decode_logits(be, target, prompts)
    decoded_with = prepared.for_generation(target).transformer.h[0].mlp.c_fc
    expect = {"int8": prepared.Int8Linear, "int4": prepared.Int4Linear}
    assert type(decoded_with) is expect.get(precision, prepared.PackedLinear)
    diff = np.abs(got - ref).max()
    assert diff <= LOGIT_TOL[precision], f"{precision}, {rows} rows: off by {diff:.3g}"
    assert np.isfinite(got).all()


@pytest.mark.parametrize("rows", [1, 16])
def test_small_matrices_decode_transposed_and_follow_training(rows, monkeypatch):
    """Below PACK_MIN_BYTES a float matrix is prepared as TransposedLinear (Wᵀ, the residual
    add fused): the decode equals the plain forward, and after a training step the prepared
    copy is remade from the new weights (for_generation's stamp)."""
    monkeypatch.setattr(prepared, "PACK_MIN_BYTES", 1 << 40)
    be = get_backend("torch", "cpu")
    model = be.init_model(SPEC, 0)
    prompts = np.random.default_rng(rows).integers(0, SPEC.vocab_size, (rows, PROMPT))
    for _ in range(2):
        got = _decode_logits(be, model, prompts)
        ref = be.logits(model, prompts)[:, -1]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
        decoded_with = prepared.for_generation(model).transformer.h[0].attn.c_proj
        assert type(decoded_with) is prepared.TransposedLinear
        assert type(model.transformer.h[0].attn.c_proj) is torch.nn.Linear  # still trainable
        _train_step(be, model)


def test_rows_decode_alone_as_in_a_batch():
    """int8 quantizes each row's activations by that row alone: a row's logits do not depend
    on which rows share its step (the engine's same-text-in-any-batch promise)."""
    be = get_backend("torch", "cpu")
    q = be.set_precision(be.init_model(SPEC, 0), "int8")
    prompts = np.random.default_rng(2).integers(0, SPEC.vocab_size, (16, PROMPT))
    prompts[3] = prompts[3] % 4  # a row of small ids beside the others
    batch = _decode_logits(be, q, prompts)
    for i in (0, 3, 15):
        alone = _decode_logits(be, q, prompts[i : i + 1])[0]
        np.testing.assert_allclose(alone, batch[i], rtol=0, atol=1e-5)


def test_inference_models_are_prepared_in_place(tiny_ckpt):
    lm = inference.load(tiny_ckpt, backend="torch", device="cpu", precision="fp32")
    plain = lm.backend.load_model(lm.checkpoint.model, "fp32")
    assert getattr(lm.model, "prepared", False)
    assert prepared.for_generation(lm.model) is lm.model  # no second copy
    x = np.array([lm.encode("ROMEO:\nWhat say you")])
    diff = np.abs(lm.backend.logits(lm.model, x) - lm.backend.logits(plain, x)).max()
    assert diff <= 1e-4
    assert any(isinstance(m, prepared.PackedLinear) for m in lm.model.modules())


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_quantized_checkpoint_loads_without_a_float_copy(tmp_path, precision, monkeypatch):
    """From the file's own int8/int4 groups: beyond the finished model, a load allocates at
    most about one of the file's tensors, never a float matrix (4x an int8 one, 8x int4)."""
    import polygpt.backends.torch_backend.loading as loading

    be = get_backend("torch", "cpu")
    spec = ModelSpec(vocab_size=2048, block_size=64, n_layer=2, n_head=4, n_embd=128, bias=True)
    path = tmp_path / "q.safetensors"
    bits, g = (8, 64) if precision == "int8" else (4, 64)
    meta = modelfile.metadata(spec, quantization=quantized.Quantization(bits, g).to_json())
    be.save_quantized(be.init_model(spec, 0), path, meta, bits, g)
    be.load_model(modelfile.check(path, spec), precision)  # first use imports the kernels' modules
    monkeypatch.setattr(loading, "CHUNK_BYTES", 32 << 10)
    with LiveBytes() as counted:
        model = be.load_model(modelfile.check(path, spec), precision)
    held = be.model_bytes(model)
    with tensorfile.TensorFile(path) as f:
        largest = max(e.nbytes for e in f.entries.values())
    float_matrix = 4 * spec.vocab_size * spec.n_embd
    # in flight: a tensor of the file, a chunk of rows, and (int4) 64 rows being repacked as
    # int32 for torch's layout
    repack = 64 * 4 * spec.n_embd * 4 * 5 // 4 if precision == "int4" else 0
    assert counted.peak - held <= largest + (32 << 10) + repack < float_matrix, (
        f"{precision}: peak {counted.peak:,}, model {held:,}, largest file tensor {largest:,}"
    )


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_a_missing_kernel_falls_back_and_says_so(precision, monkeypatch):
    """A torch build or CPU without oneDNN's packing or the int8/int4 kernels: the same model,
    on the rounded weights in fp32, and `kernel` names the fallback."""
    monkeypatch.setattr(prepared, "available", lambda kernel: False)
    be = get_backend("torch", "cpu")
    model = be.init_model(SPEC, 0)
    prompts = np.random.default_rng(3).integers(0, SPEC.vocab_size, (2, PROMPT))
    ref = be.logits(model, prompts)[:, -1]
    target = model if precision == "fp32" else be.set_precision(copy.deepcopy(model), precision)
    got = _decode_logits(be, target, prompts)
    assert np.abs(got - ref).max() <= LOGIT_TOL[precision]
    assert (
        be.kernel(precision) == "aten"
        if precision == "fp32"
        else "dequantized" in be.kernel(precision)
    )
    assert not any(isinstance(m, prepared.PackedLinear) for m in target.modules())
