"""torch backend on its own, beyond the contract every backend meets (test_backend_contract.py):
device names. The thread tuner and compile fallback: test_torch_training.py; the lean decode
step: test_torch_decode.py."""

from __future__ import annotations

import pytest

from polygpt.backends import available_backends, get_backend
from polygpt.errors import PolygptError

pytestmark = pytest.mark.skipif(
    "torch" not in available_backends(),
    reason="torch is not installed (pip install 'polygpt[torch]')",
)


def test_devices():
    be = get_backend("torch", "cpu")
    assert be.device == "cpu"
    with pytest.raises(PolygptError, match="unknown torch device"):
        get_backend("torch", "tpu")
    for device in ("cuda", "mps"):
        try:
            other = get_backend("torch", device)
        except PolygptError as e:
            assert "not available" in str(e)
        else:
            assert other.device == device
