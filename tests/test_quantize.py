"""Precisions and quantized checkpoints: every precision of every backend loads and samples
text; `polygpt quantize` writes one format (MLX's affine group quantization) that both backends
load, byte for byte the same from either quantizer; modelfile.py validates quantized files; sizes
are measured (file bytes, and in-memory bytes that count prepared int8/int4 weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file as np_load
from safetensors.numpy import save_file as np_save

from polygpt import checkpoints, inference, modelfile, tensorfile
from polygpt.backends import available_backends, get_backend
from polygpt.cli import main
from polygpt.errors import PolygptError
from polygpt.generate import GenerationConfig, generate

from .conftest import requires

PRECISIONS = {
    "torch": ["fp32", "fp16", "bf16", "int8", "int4"],
    "mlx": ["fp32", "fp16", "bf16", "int8", "int4"],
}
CASES = [
    pytest.param(b, p, marks=requires(b), id=f"{b}-{p}") for b, ps in PRECISIONS.items() for p in ps
]
# max |logit - fp32 logit| on the tiny model; a broken weight moves logits by O(1)
LOGIT_TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 0.1, "int8": 0.15, "int4": 0.5}
# cached (decode step) vs full forward at the same precision: torch's int8 quantizes each
# row's activations, and its int4 computes in bf16, so a one-row step and a whole-window pass
# round a little differently there
CACHE_TOL = {"fp32": 1e-5, "fp16": 2e-2, "bf16": 0.2, "int8": 1e-5, "int4": 1e-5}
TORCH_CACHE_TOL = {"int8": 0.05, "int4": 0.05}
# one file read by torch and by MLX: the same weights, each framework's arithmetic (half
# precision: the parity tests' tolerances; torch's int8 re-quantizes per output channel and
# quantizes activations, its int4 multiplies in bf16)
READER_TOL = {"int8": 1e-4, "int4": 1e-4, "fp16": 5e-3, "bf16": 4e-2}
TORCH_READER_TOL = {"int8": 0.15, "int4": 0.1}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_ckpt):
    """The tiny checkpoint quantized by each available backend, at each precision."""
    out = {}
    root = tmp_path_factory.mktemp("quantized")
    runner = CliRunner()
    for be in available_backends():
        for p in ("int8", "int4", "fp16", "bf16"):
            d = root / f"{be}-{p}"
            res = runner.invoke(
                main, ["quantize", str(tiny_ckpt), "--out", str(d), "-p", p, "--backend", be]
            )
            assert res.exit_code == 0, res.output
            out[be, p] = d
    return out


@pytest.mark.parametrize("backend,precision", CASES)
def test_each_precision_loads_and_samples(tiny_ckpt, backend, precision):
    lm = inference.load(tiny_ckpt, backend=backend, device="cpu", precision=precision)
    ref = inference.load(tiny_ckpt, backend=backend, device="cpu", precision="fp32")
    x = np.array([lm.encode("ROMEO:\nWhat say you, my lord? I am a")[:32]])
    diff = np.abs(lm.backend.logits(lm.model, x) - ref.backend.logits(ref.model, x)).max()
    assert diff <= LOGIT_TOL[precision], f"{precision} logits off by {diff:.3g}"
    text = lm.generate(["ROMEO:"], GenerationConfig(max_new_tokens=60, temperature=0.8))[0]
    assert len(text) == 60 and set(text) <= set(lm.tokenizer.chars)
    # the KV-cached step agrees with a full forward at this precision, through a slide
    prompts = [lm.encode("ROMEO:"), lm.encode("First Citizen:\n")]  # slide at steps 27, 18
    steps = []
    cfg = GenerationConfig(max_new_tokens=30, temperature=1.0, seed=1)
    observe = lambda rows, x: steps.append([(r.window(), x[i]) for i, r in enumerate(rows)])  # noqa: E731
    generate(lm.backend, lm.model, 32, prompts, cfg, observe=observe)
    worst = 0.0
    for t, step in enumerate(steps):
        if t in (0, 1, 2, 17, 18, 19, 26, 27, 28, 29):  # the start and around both slides
            for window, logits in step:
                full = lm.backend.logits(lm.model, window[None])[0, -1]
                worst = max(worst, float(np.abs(full - logits).max()))
    tol = TORCH_CACHE_TOL.get(precision, CACHE_TOL[precision]) if backend == "torch" else None
    tol = tol or CACHE_TOL[precision]
    assert worst <= tol, f"cached vs full at {precision}: {worst:.3g}"


@requires("torch")
def test_torch_refuses_an_unknown_precision(tiny_ckpt):
    res = CliRunner().invoke(main, ["sample", str(tiny_ckpt), "--backend", "torch", "-p", "fp8"])
    assert res.exit_code != 0 and "fp8" in res.output
    with pytest.raises(PolygptError, match="not supported"):
        inference.load(tiny_ckpt, backend="torch", device="cpu", precision="fp8")


@requires("torch", "mlx")
@pytest.mark.parametrize("bits", [8, 4])
def test_both_quantizers_write_the_same_tensors(quantized, bits):
    a = np_load(str(quantized["torch", f"int{bits}"] / checkpoints.MODEL_FILE))
    b = np_load(str(quantized["mlx", f"int{bits}"] / checkpoints.MODEL_FILE))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert a["transformer.h.0.mlp.c_fc.weight"].dtype == np.uint32


@pytest.mark.parametrize("precision", ["int8", "int4", "fp16", "bf16"])
def test_quantized_checkpoints_load_in_every_backend(tiny_ckpt, quantized, precision):
    spec = checkpoints.read(tiny_ckpt).spec
    x = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    ref = None
    for (_writer, p), d in quantized.items():
        if p != precision:
            continue
        cfg = json.loads((d / checkpoints.CONFIG_FILE).read_text())
        assert cfg["precision"] == precision
        assert modelfile.check(d / checkpoints.MODEL_FILE, spec).dtype == {
            "fp16": "F16",
            "bf16": "BF16",
        }.get(precision, precision)
        for reader in available_backends():
            lm = inference.load(d, backend=reader, device="cpu")  # precision: auto
            assert lm.precision == precision  # computed at its own precision in both
            logits = lm.backend.logits(lm.model, x)
            if ref is None:  # the file's rounded weights exactly, computed in fp32
                exact = inference.load(d, backend=reader, device="cpu", precision="fp32")
                ref = exact.backend.logits(exact.model, x)
            # one file, any writer, any reader: the same model (reader arithmetic aside)
            tol = TORCH_READER_TOL.get(precision) if reader == "torch" else None
            assert np.abs(logits - ref).max() <= (tol or READER_TOL[precision])
            out = generate(lm.backend, lm.model, 32, [[1]], GenerationConfig(max_new_tokens=20))
            assert len(out[0]) == 20


def test_quantize_cli_reports_sizes_and_refuses_bad_input(tiny_ckpt, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        main, ["quantize", str(tiny_ckpt), "--out", str(tmp_path / "q"), "-p", "int4"]
    )
    assert res.exit_code == 0, res.output
    before = (tiny_ckpt / checkpoints.MODEL_FILE).stat().st_size
    after = (tmp_path / "q" / checkpoints.MODEL_FILE).stat().st_size
    assert f"{before / 1e6:.2f} MB -> {after / 1e6:.2f} MB" in res.output
    assert after < before / 4  # 4-bit weights + scales/biases vs fp32
    again = runner.invoke(
        main, ["quantize", str(tmp_path / "q"), "--out", str(tmp_path / "r"), "-p", "int8"]
    )
    assert again.exit_code == 1 and "already int4-quantized" in again.output
    exists = runner.invoke(
        main, ["quantize", str(tiny_ckpt), "--out", str(tmp_path / "q"), "-p", "int8"]
    )
    assert exists.exit_code == 1 and "exists" in exists.output


@requires("torch")
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_torch_quantized_memory_counts_prepared_weights(tiny_ckpt, precision):
    be = get_backend("torch", "cpu")
    spec = checkpoints.read(tiny_ckpt).spec
    fp32 = be.load_model(modelfile.check(tiny_ckpt / checkpoints.MODEL_FILE, spec), "fp32")
    q = be.load_model(modelfile.check(tiny_ckpt / checkpoints.MODEL_FILE, spec), precision)
    shapes = spec.param_shapes()
    matrices = [n for n, s in shapes.items() if len(s) == 2 and n != "transformer.wpe.weight"]
    quantized = sum(np.prod(shapes[n]) for n in matrices) * (1 if precision == "int8" else 0.5)
    floats = sum(np.prod(s) for n, s in shapes.items() if n not in matrices)
    assert be.model_bytes(fp32) == 4 * sum(np.prod(s) for s in shapes.values())
    # no float copy of any matrix remains: the parameters are the LayerNorms, biases and wpe
    assert sum(p.nbytes for p in q.parameters()) == 4 * floats
    # the quantized matrices are counted (model.parameters() alone would miss them all)
    assert quantized + 4 * floats <= be.model_bytes(q) <= 0.6 * be.model_bytes(fp32)


@requires("mlx")
def test_mlx_refuses_to_requantize(quantized):
    d = quantized["mlx", "int8"]
    with pytest.raises(PolygptError, match="int8-quantized"):
        inference.load(d, backend="mlx", device="cpu", precision="int4")


# ---- modelfile.py validation of quantized files --------------------------------------------


@pytest.fixture()
def int8_file(quantized, tmp_path):
    d = quantized[available_backends()[0], "int8"]
    return d / checkpoints.MODEL_FILE


def _rewrite(src, dst, edit):
    tensors = np_load(str(src))
    _, meta = tensorfile.read_header(src)
    edit(tensors, meta)
    np_save(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t, m: t.pop("transformer.h.0.attn.c_attn.scales"), "has no"),
        (
            lambda t, m: t.__setitem__(
                "transformer.h.0.attn.c_attn.weight",
                t["transformer.h.0.attn.c_attn.weight"][:, :-1],
            ),
            "packed shape",
        ),
        (
            lambda t, m: t.__setitem__(
                "transformer.h.1.mlp.c_fc.biases",
                t["transformer.h.1.mlp.c_fc.biases"].astype(np.uint32),
            ),
            "dtype",
        ),
        (
            lambda t, m: t.__setitem__(
                "transformer.h.0.mlp.c_fc.scales",
                t["transformer.h.0.mlp.c_fc.scales"][:-1].copy(),
            ),
            "shape",
        ),
        (lambda t, m: m.pop("quantization"), "dtype U32"),
        (
            lambda t, m: m.__setitem__("quantization", '{"bits": 3, "group_size": 32}'),
            "unsupported quantization",
        ),
        (
            lambda t, m: t.__setitem__(
                "transformer.h.0.attn.c_attn.zeros", np.zeros(2, np.float32)
            ),
            "unexpected tensor",
        ),
    ],
    ids=[
        "missing-scales",
        "packed-shape",
        "scales-dtype",
        "scales-shape",
        "no-metadata",
        "bad-bits",
        "extra-tensor",
    ],
)
def test_malformed_quantized_files_are_rejected(tiny_ckpt, int8_file, tmp_path, edit, message):
    spec = checkpoints.read(tiny_ckpt).spec
    assert modelfile.check(int8_file, spec).dtype == "int8"
    bad = _rewrite(int8_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(PolygptError, match=message):
        modelfile.check(bad, spec)
    for be in available_backends():  # and no backend loads it
        with pytest.raises(PolygptError):
            get_backend(be, "cpu").load_model(modelfile.check(bad, spec), "fp32")


@requires("torch", "mlx")
def test_torch_quantizer_reproduces_mx_quantize_bit_for_bit():
    import mlx.core as mx
    import torch

    from polygpt.backends.torch_backend.quantize import affine_dequantize, affine_quantize

    rng = np.random.default_rng(0)
    w = (rng.normal(size=(48, 256)) * rng.choice([1e-4, 0.02, 3.0], size=(48, 1))).astype(
        np.float32
    )
    w[0, :64] = 0.0  # a zero group and a constant group: the edge cases of the scale rule
    w[1, :64] = 0.25
    for bits in (4, 8):
        for group in (32, 64, 128):
            tq, ts, tb = affine_quantize(torch.from_numpy(w), bits, group)
            mq, ms, mb = mx.quantize(mx.array(w), group_size=group, bits=bits)
            np.testing.assert_array_equal(
                tq.view(torch.int32).numpy().view(np.uint32), np.array(mq)
            )
            np.testing.assert_array_equal(ts.numpy(), np.array(ms))
            np.testing.assert_array_equal(tb.numpy(), np.array(mb))
            back = affine_dequantize(tq, ts, tb, bits, group).numpy()
            np.testing.assert_array_equal(
                back, np.array(mx.dequantize(mq, ms, mb, group_size=group, bits=bits))
            )
            g = w.reshape(w.shape[0], -1, group)
            step = (g.max(-1) - g.min(-1)) / (2**bits - 1)  # one quantization step per group
            err = np.abs(back - w).reshape(g.shape).max(-1)
            assert (err <= step + 1e-6).all()
