"""MLX backend on its own: names and shapes from the spec, init statistics, safetensors round
trips (bf16 kept, no NumPy), KV cache against the full forward (with left padding), optimizer
state round trip, dropout, devices and the BLAS report. Cross-backend checks: test_parity.py."""

from __future__ import annotations

import numpy as np
import pytest

from polygpt import blas, weights
from polygpt.backends import available_backends, get_backend
from polygpt.config import TrainConfig
from polygpt.errors import PolygptError
from polygpt.spec import INIT_STD, ModelSpec

pytestmark = pytest.mark.skipif(
    "mlx" not in available_backends(), reason="mlx is not installed (pip install 'polygpt[mlx]')"
)

SPEC = ModelSpec(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def be():
    return get_backend("mlx", "cpu")


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
    params = model.named_parameters()
    resid = set(spec.residual_projections())
    for name, p in params.items():
        a = np.array(p)
        if p.ndim >= 2:
            std = INIT_STD / np.sqrt(2 * spec.n_layer) if name in resid else INIT_STD
            assert abs(a.mean()) < 3 * std / np.sqrt(a.size) + 1e-4, name
            assert abs(a.std() / std - 1) < 0.05, (name, a.std(), std)
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert (a == 1).all(), name
        else:
            assert (a == 0).all(), name
    # seeded: same seed, same weights; another seed, other weights
    again = be.init_model(spec, seed=1).named_parameters()
    other = be.init_model(spec, seed=2).named_parameters()
    w = "transformer.h.0.attn.c_attn.weight"
    assert np.array_equal(np.array(params[w]), np.array(again[w]))
    assert not np.array_equal(np.array(params[w]), np.array(other[w]))


@pytest.mark.parametrize("precision,dtype", [("fp32", "F32"), ("bf16", "BF16"), ("fp16", "F16")])
def test_safetensors_round_trip_keeps_dtype(be, tmp_path, precision, dtype):
    model = be.set_precision(be.init_model(SPEC, seed=3), precision)
    path = tmp_path / "model.safetensors"
    be.save_model(model, path, weights.model_metadata(SPEC))
    assert weights.check_model_file(path, SPEC) == dtype
    _, meta = weights.read_header(path)
    assert ModelSpec.from_json(meta["spec"]) == SPEC
    loaded = be.load_model(SPEC, path, precision)
    x = _tokens((2, 16))
    np.testing.assert_array_equal(be.logits(model, x), be.logits(loaded, x))


def test_load_rejects_a_wrong_spec(be, tmp_path):
    path = tmp_path / "model.safetensors"
    be.save_model(be.init_model(SPEC, 0), path, weights.model_metadata(SPEC))
    with pytest.raises(PolygptError, match="shape"):
        be.load_model(ModelSpec(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64), path)


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
    be.save_model(a, tmp_path / "model.safetensors", weights.model_metadata(SPEC))
    be.save_optimizer(opt_a, tmp_path / "opt.safetensors", {})
    _, meta = weights.read_header(tmp_path / "opt.safetensors")
    assert meta["step"] == "3"
    b_model = be.load_model(SPEC, tmp_path / "model.safetensors")
    opt_b = be.make_optimizer(b_model, cfg)
    assert be.load_optimizer(opt_b, tmp_path / "opt.safetensors") == 3
    for b in batches[3:]:
        la = float(be.train_step(a, opt_a, [b], 1e-3, 1.0))
        lb = float(be.train_step(b_model, opt_b, [b], 1e-3, 1.0))
        assert la == pytest.approx(lb, rel=1e-6)


def test_training_lowers_the_loss_and_compile_changes_nothing(be):
    cfg = TrainConfig()
    batches = _batches(2, seed=9)
    losses = {}
    for compiled in (True, False):
        model = be.init_model(SPEC, seed=10)
        opt = be.make_optimizer(model, cfg)
        opt.compile = compiled
        losses[compiled] = [
            float(be.train_step(model, opt, [batches[i % 2]], 3e-3, 1.0)) for i in range(30)
        ]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert losses[True][-1] < losses[True][0] - 0.5


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


def test_devices(be):
    assert be.device == "cpu"
    with pytest.raises(PolygptError, match="unknown mlx device"):
        get_backend("mlx", "tpu")
    try:
        gpu = get_backend("mlx", "cuda")  # torch's name maps to MLX's "gpu"
    except PolygptError as e:
        assert "not available" in str(e)
    else:
        assert gpu.device == "gpu"
    get_backend("mlx", "cpu")  # back to the CPU for the tests that follow


def test_precision_errors(be):
    with pytest.raises(PolygptError, match="not supported"):
        be.set_precision(be.init_model(SPEC, 0), "fp8")


def test_describe_reports_the_blas(be):
    d = be.describe()
    assert set(d) >= {"backend", "framework", "device", "device_name", "threads", "blas"}
    assert d["framework"].startswith("mlx ")
    if blas.find_openblas() and not blas.os.environ.get(blas.OPT_OUT_ENV):
        assert d["blas"].startswith("OpenBLAS"), d["blas"]
    elif blas.sys.platform == "linux":
        assert "bundled" in d["blas"] or "(" in d["blas"], d["blas"]


@pytest.mark.skipif(blas.find_openblas() is None, reason="no system OpenBLAS on this machine")
def test_openblas_is_loaded_unless_opted_out():
    """In a fresh process (the BLAS is chosen when MLX loads): OpenBLAS by default, the bundled
    reference BLAS with POLYGPT_NO_BLAS_FIX=1, and the same logits either way."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np; from polygpt.backends import get_backend; "
        "from polygpt.spec import ModelSpec; be = get_backend('mlx', 'cpu'); "
        "m = be.init_model(ModelSpec(vocab_size=65, block_size=32, n_layer=2, n_head=2, "
        "n_embd=32), 0); x = np.arange(64).reshape(2, 32) % 65; "
        "print(be.describe()['blas']); print(float(be.logits(m, x).sum(dtype=np.float64)))"
    )
    out = {}
    for opt_out in ("", "1"):
        env = {**os.environ, blas.OPT_OUT_ENV: opt_out}
        res = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        out[opt_out] = res.stdout.splitlines()
    assert out[""][0].startswith("OpenBLAS"), out[""]
    assert out["1"][0].startswith("bundled reference BLAS"), out["1"]
    assert float(out[""][1]) == pytest.approx(float(out["1"][1]), abs=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gelu_tanh_matches_the_formula(dtype):
    """The rational-tanh GELU and its hand-written derivative against NumPy's float64 tanh."""
    import mlx.core as mx

    from polygpt.backends.mlx_backend.model import gelu_tanh

    x = np.linspace(-12, 12, 20001)
    k = np.sqrt(2 / np.pi)
    xm = mx.array(x.astype(np.float32)).astype(getattr(mx, dtype))
    y = gelu_tanh(xm)
    dy = mx.grad(lambda a: gelu_tanh(a).sum())(xm)
    assert y.dtype == dy.dtype == xm.dtype
    xq = np.array(xm.astype(mx.float32), dtype=np.float64)  # the inputs as rounded to dtype
    tq = np.tanh(k * (xq + 0.044715 * xq**3))
    ref = 0.5 * xq * (1 + tq)
    dref = 0.5 * (1 + tq) + 0.5 * xq * (1 - tq * tq) * k * (1 + 3 * 0.044715 * xq**2)
    tol = {"float32": 2e-6, "float16": 1e-2, "bfloat16": 8e-2}[dtype]  # output rounding
    y64 = np.array(y.astype(mx.float32), dtype=np.float64)
    dy64 = np.array(dy.astype(mx.float32), dtype=np.float64)
    assert np.abs(y64 - ref).max() <= tol
    assert np.abs(dy64 - dref).max() <= max(tol, 1e-5)
