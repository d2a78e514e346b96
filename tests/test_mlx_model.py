"""MLX backend on its own, beyond the contract every backend meets (test_backend_contract.py):
the compiled train step equals the eager one, torch's device names, the BLAS report and the
GELU."""

from __future__ import annotations

import numpy as np
import pytest

from polygpt import blas
from polygpt.backends import available_backends, get_backend
from polygpt.config import TrainConfig
from polygpt.errors import PolygptError
from polygpt.spec import ModelSpec

from .test_backend_contract import _batches

pytestmark = pytest.mark.skipif(
    "mlx" not in available_backends(), reason="mlx is not installed (pip install 'polygpt[mlx]')"
)

SPEC = ModelSpec(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def be():
    return get_backend("mlx", "cpu")


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


def test_torch_device_names_map_to_mlx_s(be):
    try:
        gpu = get_backend("mlx", "cuda")  # torch's name maps to MLX's "gpu"
    except PolygptError as e:
        assert "not available" in str(e)
    else:
        assert gpu.device == "gpu"
    get_backend("mlx", "cpu")  # back to the CPU for the tests that follow


def test_describe_reports_the_blas(be):
    d = be.describe()
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
