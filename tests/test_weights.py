"""Checkpoint directory I/O: round trips, validation, atomic writes."""

import json
import math
import os

import pytest
from safetensors import safe_open

from polygpt import atomic, checkpoints, metrics_log, modelfile, tensorfile
from polygpt.backends import get_backend
from polygpt.errors import PolygptError
from polygpt.spec import ModelSpec

from .conftest import backends_under_test

SPEC = ModelSpec(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
MODEL = checkpoints.MODEL_FILE


def _save(be, model, out, spec=SPEC):
    return checkpoints.write(
        out,
        config={"spec": spec.to_dict(), "step": 3},
        tokenizer={"type": "char", "chars": [chr(97 + i) for i in range(11)]},
        save_model=lambda p: be.save_model(model, p, modelfile.metadata(spec)),
    )


@pytest.mark.parametrize("name", backends_under_test())
def test_round_trip_is_identical(name, tmp_path):
    import numpy as np

    be = get_backend(name, "cpu")
    model = be.init_model(SPEC, seed=0)
    assert be.param_shapes(model) == SPEC.param_shapes()
    out = _save(be, model, tmp_path / "ck")
    ckpt = checkpoints.read(out)
    assert ckpt.spec == SPEC and ckpt.step == 3
    assert (ckpt.model.dtype, ckpt.model.precision, ckpt.model.quantization) == (
        "F32",
        "fp32",
        None,
    )
    tensors, meta = tensorfile.read_header(ckpt.model_file)
    assert set(tensors) == set(SPEC.param_shapes())
    assert ModelSpec.from_json(meta["spec"]) == SPEC
    loaded = be.load_model(ckpt.model)
    x = np.arange(16).reshape(2, 8) % 11
    assert np.array_equal(be.logits(model, x), be.logits(loaded, x))  # bit-identical weights
    # save again from the loaded model: the same tensors, bit for bit
    out2 = _save(be, loaded, tmp_path / "ck2")
    with (
        safe_open(str(out / "model.safetensors"), "numpy") as a,
        safe_open(str(out2 / "model.safetensors"), "numpy") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert np.array_equal(a.get_tensor(k), b.get_tensor(k)), k


@pytest.mark.parametrize("name", backends_under_test())
def test_corrupt_and_mismatched_files(name, tmp_path):
    be = get_backend(name, "cpu")
    model = be.init_model(SPEC, seed=0)
    out = _save(be, model, tmp_path / "ck")
    f = out / "model.safetensors"
    raw = f.read_bytes()

    f.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(PolygptError, match="not a valid safetensors"):
        checkpoints.read(out)  # a checkpoint is read checked, its model file included
    f.write_bytes(b"garbage")
    with pytest.raises(PolygptError, match="not a valid safetensors"):
        modelfile.check(f, SPEC)
    f.write_bytes(raw)
    wider = ModelSpec(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    with pytest.raises(PolygptError, match="shape"):
        modelfile.check(f, wider)
    deeper = ModelSpec(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=8)
    with pytest.raises(PolygptError, match="missing tensor 'transformer.h.2"):
        modelfile.check(f, deeper)
    biased = ModelSpec(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=True)
    with pytest.raises(PolygptError, match="missing tensor"):
        modelfile.check(f, biased)


@pytest.mark.parametrize("name", backends_under_test())
def test_loading_checks_the_model_file_once(name, tmp_path, monkeypatch):
    """inference.load reads the checkpoint checked, and the backend loads what was checked."""
    from polygpt import inference

    be = get_backend(name, "cpu")
    out = _save(be, be.init_model(SPEC, 0), tmp_path / "ck")
    checked, real = [], modelfile.check
    monkeypatch.setattr(modelfile, "check", lambda *a: checked.append(a) or real(*a))
    lm = inference.load(out, backend=name, device="cpu")
    assert checked == [(out / MODEL, SPEC)]
    assert lm.precision == "fp32" and lm.checkpoint.model.path == out / MODEL


def test_read_checkpoint_errors(tmp_path):
    with pytest.raises(PolygptError, match="does not exist"):
        checkpoints.read(tmp_path / "nope")
    d = tmp_path / "ck"
    d.mkdir()
    with pytest.raises(PolygptError, match="config.json is missing"):
        checkpoints.read(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(PolygptError, match="not valid JSON"):
        checkpoints.read(d)
    (d / "config.json").write_text(json.dumps({"spec": {**SPEC.to_dict(), "n_embed": 3}}))
    with pytest.raises(PolygptError, match="unknown model spec key"):
        checkpoints.read(d)


def _zeros(path, tag: str) -> None:
    """A valid fp32 model file of SPEC, all zeros, told apart by `tag` in its metadata."""
    shapes = SPEC.param_shapes()
    tensorfile.write_tensors(
        path,
        [(n, "F32", s) for n, s in shapes.items()],
        lambda n: bytes(4 * math.prod(shapes[n])),
        modelfile.metadata(SPEC, tag=tag),
    )


def test_failed_write_keeps_the_old_checkpoint(tmp_path):
    out = tmp_path / "ck"
    good = checkpoints.write(
        out,
        config={"spec": SPEC.to_dict(), "step": 1},
        tokenizer={},
        save_model=lambda p: _zeros(p, "old"),
    )
    old = (good / "model.safetensors").read_bytes()
    metrics_log.append(out, {"step": 1})

    def crash(p):
        p.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(PolygptError, match=r"\(disk full\): .* still holds its step 1 checkpoint"):
        checkpoints.write(out, config={"step": 2}, tokenizer={}, save_model=crash)
    assert (good / "model.safetensors").read_bytes() == old
    assert json.loads((good / "config.json").read_text())["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left behind
    # a new snapshot carries the run's metrics file over
    checkpoints.write(
        out, config={"step": 2}, tokenizer={}, save_model=lambda p: p.write_bytes(b"new")
    )
    assert metrics_log.read(out) == [{"step": 1}]
    # a crash between the two renames is recovered from the .old sibling
    os.replace(out, tmp_path / ".ck.old")
    atomic.recover(out)
    assert (out / "model.safetensors").read_bytes() == b"new"
