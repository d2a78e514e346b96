"""Conversions: nanoGPT ckpt.pt import (never executing code), HF GPT-2 export and import."""

import numpy as np
import pytest

from polygpt import checkpoints, convert, inference
from polygpt.errors import PolygptError
from polygpt.spec import ModelSpec

from .conftest import requires

torch = pytest.importorskip("torch")
X = (np.arange(2 * 32).reshape(2, 32) * 7) % 65


def _logits(path, backend="torch"):
    lm = inference.load(path, backend=backend, device="cpu")
    return lm.backend.logits(lm.model, X)


@requires("torch")
def test_export_to_hf_matches_transformers(random_ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = convert.to_hf(random_ckpt, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(X)).logits.numpy()
    ours = _logits(random_ckpt)
    diff = np.abs(ref - ours)
    assert diff.max() <= 1e-4, f"max {diff.max():.2e} mean {diff.mean():.2e}"


@requires("torch")
def test_hf_round_trip(random_ckpt, tmp_path, char_data):
    hf_dir = convert.to_hf(random_ckpt, tmp_path / "hf")
    back = convert.from_hf(hf_dir, tmp_path / "back", tokenizer_dir=char_data)
    ck = checkpoints.read(back)
    assert ck.spec.bias and ck.spec.activation == "gelu_tanh"  # GPT-2 always has biases
    np.testing.assert_allclose(_logits(back), _logits(random_ckpt), atol=1e-5)


def _nanogpt_ckpt(path, spec, compiled=True):
    """A ckpt.pt laid out exactly as nanoGPT's train.py saves it."""
    from polygpt.backends.torch_backend.model import GPT

    model = GPT(spec)
    model.init_weights(torch.Generator().manual_seed(0))
    sd = model.state_dict()
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    for i in range(spec.n_layer):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(8, 8)).view(1, 1, 8, 8)
    if compiled:
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    args = dict(
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_embd=spec.n_embd,
        block_size=spec.block_size,
        bias=spec.bias,
        vocab_size=spec.vocab_size,
        dropout=0.0,
    )
    torch.save(
        {
            "model": sd,
            "optimizer": {},
            "model_args": args,
            "iter_num": 250,
            "best_val_loss": torch.tensor(1.9),
            "config": {"dataset": "shakespeare_char"},
        },
        path,
    )
    return model


@requires("torch")
def test_nanogpt_import(tmp_path, char_data):
    spec = ModelSpec(
        vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=16, activation="gelu"
    )
    ref = _nanogpt_ckpt(tmp_path / "ckpt.pt", spec)
    out = convert.from_nanogpt(tmp_path / "ckpt.pt", tmp_path / "ck", tokenizer_dir=char_data)
    ck = checkpoints.read(out)
    assert ck.spec == spec and ck.config["metrics"]["val_loss"] == pytest.approx(1.9)
    with torch.no_grad():
        expected = ref(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(_logits(out), expected, atol=1e-6)
    with pytest.raises(PolygptError, match="needs --tokenizer"):
        convert.from_nanogpt(tmp_path / "ckpt.pt", tmp_path / "ck2")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/polygpt_pwned",))


@requires("torch")
def test_nanogpt_import_never_executes_code(tmp_path, char_data):
    import pickle
    from pathlib import Path

    marker = Path("/tmp/polygpt_pwned")
    marker.unlink(missing_ok=True)
    bad = tmp_path / "ckpt.pt"
    torch.save({"model": _Evil(), "model_args": {}}, bad, pickle_module=pickle)
    with pytest.raises(PolygptError, match="cannot read"):
        convert.from_nanogpt(bad, tmp_path / "out", tokenizer_dir=char_data)
    assert not marker.exists() and not (tmp_path / "out").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PolygptError, match="cannot read"):
        convert.from_nanogpt(tmp_path / "junk.pt", tmp_path / "out", tokenizer_dir=char_data)


@requires("torch")
def test_convert_cli_detects_formats(random_ckpt, tmp_path, char_data):
    from click.testing import CliRunner

    from polygpt.cli import main

    r = CliRunner().invoke(main, ["convert", str(random_ckpt), str(tmp_path / "hf")])
    assert r.exit_code == 0 and "(hf)" in r.output, r.output
    r = CliRunner().invoke(
        main,
        ["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--tokenizer", str(char_data)],
    )
    assert r.exit_code == 0 and "(polygpt)" in r.output, r.output
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "nothing"), str(tmp_path / "x")])
    assert r.exit_code == 1 and r.output.startswith("error: cannot tell"), r.output


def _hf_gpt2(tmp_path, **shape):
    """A randomly initialised GPT2LMHeadModel saved as a user's downloaded directory would be."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    hf.save_pretrained(tmp_path / "hf_src")
    return hf, tmp_path / "hf_src"


def _check_hf_import(hf, hf_dir, tmp_path, x, backends):
    with torch.no_grad():
        ref = hf(torch.from_numpy(x)).logits.numpy()
    ck = convert.from_hf(hf_dir, tmp_path / "ck")
    assert checkpoints.read(ck).tokenizer["type"] == "tiktoken"  # vocab 50257: GPT-2 BPE
    for b in backends:
        lm = inference.load(ck, backend=b, device="cpu")
        diff = np.abs(lm.backend.logits(lm.model, x) - ref)
        assert diff.max() <= 1e-4, f"{b}: max {diff.max():.2e} mean {diff.mean():.2e}"
        del lm
    back = convert.to_hf(ck, tmp_path / "hf_back")  # and out again
    hf2 = type(hf).from_pretrained(back).eval()
    with torch.no_grad():
        np.testing.assert_allclose(hf2(torch.from_numpy(x)).logits.numpy(), ref, atol=1e-5)


def _available(*names):
    from polygpt.backends import available_backends

    return [n for n in names if n in available_backends()]


@requires("torch")
def test_hf_gpt2_import_matches_transformers_in_both_backends(tmp_path):
    """A tiny GPT-2 (vocab 50257, like the real one) from save_pretrained, both directions."""
    hf, d = _hf_gpt2(tmp_path, n_layer=2, n_head=2, n_embd=32, n_positions=64)
    x = np.random.default_rng(0).integers(0, 50257, size=(2, 48))
    _check_hf_import(hf, d, tmp_path, x, _available("torch", "mlx"))


@requires("torch")
def test_hf_gpt2_124m_shape_imports_exactly(tmp_path):
    """Once at GPT-2 small's real shape (124M parameters, ~0.5 GB per copy)."""
    hf, d = _hf_gpt2(tmp_path)
    x = np.random.default_rng(1).integers(0, 50257, size=(1, 64))
    _check_hf_import(hf, d, tmp_path, x, _available("torch", "mlx"))


@requires("torch")
def test_hf_configs_polygpt_would_compute_differently_are_refused(tmp_path):
    """Before any weight is read: one line naming what is missing or different."""
    import json

    base = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_layer": 2}
    base |= {"n_head": 2, "n_embd": 32}
    cases = [
        ({"n_embd": None}, "lacks 'n_embd'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "attention scaled other than"),
        ({"scale_attn_weights": False}, "attention scaled other than"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon must be"),
        ({"activation_function": "relu"}, "unsupported activation"),
        ({"n_inner": 64}, "n_inner must be"),
    ]
    for change, message in cases:
        cfg = {k: v for k, v in (base | change).items() if v is not None}
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(PolygptError, match=message):
            convert.from_hf(tmp_path / "d", tmp_path / "out")
        assert not (tmp_path / "out").exists()
