"""The backend contract, one test per behaviour, run on every installed backend (as mlx-lm runs
one test runner over every model): names and shapes from the spec, init statistics,
safetensors round trips (dtype kept), optimizer state round trip, gradient accumulation,
dropout, log-probs, precision errors, describe(), devices and the framework facts. Tiny random
models, no training data. Framework-specific checks: test_torch_training.py,
test_torch_decode.py, test_mlx_model.py; the slot cache's row operations: test_slots.py;
cross-backend numbers: test_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from polygpt import modelfile, tensorfile
from polygpt.backends import backend_class, get_backend
from polygpt.config import TrainConfig
from polygpt.errors import PolygptError
from polygpt.spec import INIT_STD, ModelSpec

from .conftest import backends_under_test

SPEC = ModelSpec(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module", params=backends_under_test())
def be(request):
    return get_backend(request.param, "cpu")


def _params(be, model, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The model's parameters as NumPy, through the one format every backend writes."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        be.save_model(model, path, modelfile.metadata(spec))
        return load_file(str(path))


def _tokens(shape, seed=0, vocab=65):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


@pytest.mark.parametrize(
    "spec",
    [
        SPEC,
        ModelSpec(
            vocab_size=50,
            block_size=16,
            n_layer=3,
            n_head=4,
            n_embd=16,
            bias=True,
            activation="gelu",
        ),
    ],
    ids=["nobias", "bias"],
)
def test_parameters_are_the_spec(be, spec):
    model = be.init_model(spec, seed=0)
    shapes = be.param_shapes(model)
    assert list(shapes.items()) == list(spec.param_shapes().items())  # names, shapes, order
    assert "lm_head.weight" not in shapes  # tied to wte, stored once


def test_init_statistics(be):
    spec = ModelSpec(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=True)
    model = be.init_model(spec, seed=1)
    params = _params(be, model, spec)
    resid = set(spec.residual_projections())
    for name, a in params.items():
        if a.ndim >= 2:
            std = INIT_STD / np.sqrt(2 * spec.n_layer) if name in resid else INIT_STD
            assert abs(a.mean()) < 3 * std / np.sqrt(a.size) + 1e-4, name
            assert abs(a.std() / std - 1) < 0.05, (name, a.std(), std)
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert (a == 1).all(), name
        else:
            assert (a == 0).all(), name
    # seeded: same seed, same weights; another seed, other weights
    again = _params(be, be.init_model(spec, seed=1), spec)
    other = _params(be, be.init_model(spec, seed=2), spec)
    w = "transformer.h.0.attn.c_attn.weight"
    assert np.array_equal(params[w], again[w])
    assert not np.array_equal(params[w], other[w])


@pytest.mark.parametrize("precision,dtype", [("fp32", "F32"), ("bf16", "BF16"), ("fp16", "F16")])
def test_safetensors_round_trip_keeps_dtype(be, tmp_path, precision, dtype):
    model = be.set_precision(be.init_model(SPEC, seed=3), precision)
    path = tmp_path / "model.safetensors"
    be.save_model(model, path, modelfile.metadata(SPEC))
    assert modelfile.check(path, SPEC).dtype == dtype
    _, meta = tensorfile.read_header(path)
    assert ModelSpec.from_json(meta["spec"]) == SPEC
    loaded = be.load_model(modelfile.check(path, SPEC), precision)
    x = _tokens((2, 16))
    np.testing.assert_array_equal(be.logits(model, x), be.logits(loaded, x))


def test_load_rejects_a_wrong_spec(be, tmp_path):
    path = tmp_path / "model.safetensors"
    be.save_model(be.init_model(SPEC, 0), path, modelfile.metadata(SPEC))
    with pytest.raises(PolygptError, match="shape"):
        modelfile.check(
            path, ModelSpec(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64)
        )


def _batches(n, seed, shape=(4, 32)):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        chunk = rng.integers(0, 65, size=(shape[0], shape[1] + 1)).astype(np.int32)
        out.append((chunk[:, :-1], chunk[:, 1:]))
    return out


def test_optimizer_state_round_trip_continues_the_same_run(be, tmp_path):
    cfg = TrainConfig()
    batches = _batches(6, seed=7)
    a = be.init_model(SPEC, seed=8)
    opt_a = be.make_optimizer(a, cfg)
    for b in batches[:3]:
        be.train_step(a, opt_a, [b], 1e-3, 1.0)
    be.save_model(a, tmp_path / "model.safetensors", modelfile.metadata(SPEC))
    be.save_optimizer(opt_a, tmp_path / "opt.safetensors", {})
    _, meta = tensorfile.read_header(tmp_path / "opt.safetensors")
    assert meta["step"] == "3"
    b_model = be.load_model(modelfile.check(tmp_path / "model.safetensors", SPEC))
    opt_b = be.make_optimizer(b_model, cfg)
    assert be.load_optimizer(opt_b, tmp_path / "opt.safetensors") == 3
    for b in batches[3:]:
        la = float(be.train_step(a, opt_a, [b], 1e-3, 1.0))
        lb = float(be.train_step(b_model, opt_b, [b], 1e-3, 1.0))
        assert la == pytest.approx(lb, rel=1e-6)


def test_training_lowers_the_loss(be):
    cfg = TrainConfig()
    batches = _batches(2, seed=9)
    model = be.init_model(SPEC, seed=10)
    opt = be.make_optimizer(model, cfg)
    losses = [float(be.train_step(model, opt, [batches[i % 2]], 3e-3, 1.0)) for i in range(30)]
    assert losses[-1] < losses[0] - 0.5


def test_grad_accumulation_equals_one_big_batch(be):
    cfg = TrainConfig()
    (x1, y1), (x2, y2) = _batches(2, seed=11)
    losses = []
    for batches in ([(x1, y1), (x2, y2)], [(np.concatenate([x1, x2]), np.concatenate([y1, y2]))]):
        model = be.init_model(SPEC, seed=12)
        opt = be.make_optimizer(model, cfg)
        losses.append([float(be.train_step(model, opt, batches, 1e-3, 1.0)) for _ in range(3)])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_dropout_is_active_in_training_only(be):
    spec = ModelSpec(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.3)
    model = be.init_model(spec, seed=13)
    ((x, y),) = _batches(1, seed=14)
    evals = {be.eval_loss(model, x, y) for _ in range(2)}
    assert len(evals) == 1  # no dropout at evaluation
    opt = be.make_optimizer(model, TrainConfig(weight_decay=0.0))
    # lr 0: parameters stay put, so different losses can only come from dropout masks
    train = {float(be.train_step(model, opt, [(x, y)], 0.0, 0.0)) for _ in range(3)}
    assert len(train) == 3
    assert be.eval_loss(model, x, y) == evals.pop()


def test_target_logprobs_are_log_softmax(be):
    model = be.init_model(SPEC, seed=15)
    ((x, y),) = _batches(1, seed=16)
    lp = be.target_logprobs(model, x, y)
    assert lp.dtype == np.float64 and lp.shape == x.shape
    z = be.logits(model, x).astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    ref = np.take_along_axis(z - np.log(np.exp(z).sum(-1, keepdims=True)), y[..., None], -1)
    np.testing.assert_allclose(lp, ref[..., 0], atol=1e-5)
    assert -lp.mean() == pytest.approx(be.eval_loss(model, x, y), rel=1e-5)


def test_precision_errors(be):
    with pytest.raises(PolygptError, match="not supported"):
        be.set_precision(be.init_model(SPEC, 0), "fp8")


def test_describe(be):
    d = be.describe()
    assert set(d) >= {"backend", "framework", "device", "device_name", "threads", "blas"}
    assert d["backend"] == be.name and d["framework"].startswith(be.name + " ")


def test_facts(be):
    """The class attributes every module above backends/ reads instead of a backend's name."""
    cls = type(be)
    assert cls.devices[0] == "cpu" and set(cls.train_dtypes) <= set(cls.precisions)
    assert backend_class(be.name) is cls
    assert set(be.device_precisions("cpu")) <= set(cls.precisions) and "fp32" in cls.precisions


def test_devices(be):
    """cpu always; an unknown name is an error naming the backend; every other known device is
    either there or a one-line "not available"."""
    assert get_backend(be.name, "cpu").device == "cpu"
    with pytest.raises(PolygptError, match=f"unknown {be.name} device"):
        get_backend(be.name, "tpu")
    for device in type(be).devices[1:]:
        try:
            other = get_backend(be.name, device)
        except PolygptError as e:
            assert "not available" in str(e)
        else:
            assert other.device == device
