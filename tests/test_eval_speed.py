"""Training's precisions chosen at run time (`train.dtype` / `train.eval_dtype` = auto), and
its loss estimates made fast without changing what they measure: bf16 forwards, MLX's compiled
forward."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polygpt import config, data, train
from polygpt.backends import get_backend
from polygpt.errors import PolygptError

from .conftest import ROOT, TINY, backends_under_test, requires


def _model_and_batch(name: str, char_data, rows: int = 16):
    be = get_backend(name, "cpu")
    cfg = config.load(ROOT / "configs" / "shakespeare_char.toml", TINY)
    model = be.init_model(cfg.model.to_spec(65), 0)
    arr = data.load_split(char_data, "val")
    x, y = data.get_batch(arr, 32, rows, np.random.default_rng(0))
    return be, model, x, y


@pytest.mark.parametrize("name", backends_under_test())
def test_auto_precisions_resolve_to_what_the_backend_trains_in(name):
    be = get_backend(name, "cpu")
    assert be.auto_dtype() in be.train_dtypes
    cfg = config.load(ROOT / "configs" / "shakespeare_char.toml", [*TINY, "dtype=auto"])
    assert train.dtypes(cfg.train, be) == (be.auto_dtype(), be.auto_dtype())
    cfg = config.load(ROOT / "configs" / "shakespeare_char.toml", [*TINY, "dtype=fp32"])
    assert train.dtypes(cfg.train, be) == ("fp32", "fp32")  # evaluation follows the step
    cfg = config.load(
        ROOT / "configs" / "shakespeare_char.toml", [*TINY, "dtype=auto", "eval_dtype=bf16"]
    )
    assert train.dtypes(cfg.train, be) == (be.auto_dtype(), "bf16")
    assert be.eval_positions(be.auto_dtype()) >= 512


@pytest.mark.parametrize("name", backends_under_test())
def test_bf16_evaluation_estimates_the_fp32_loss(name, char_data):
    be, model, x, y = _model_and_batch(name, char_data)
    fp32, bf16 = be.eval_loss(model, x, y), be.eval_loss(model, x, y, "bf16")
    assert fp32 != bf16  # it really computed in bf16...
    assert bf16 == pytest.approx(fp32, rel=2e-3)  # ...and the mean loss barely moves
    assert be.eval_loss(model, x, y) == fp32  # the fp32 weights are untouched


@requires("torch")
def test_torch_computes_in_bf16_only_where_the_cpu_multiplies_it():
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert get_backend("torch", "cpu").auto_dtype() == ("bf16" if native else "fp32")


@requires("torch")
def test_torch_bf16_attention_on_the_cpu_is_sdpa_within_rounding():
    import torch
    import torch.nn.functional as F

    from polygpt.backends.torch_backend.model import _causal_attention

    q, k, v = (
        torch.randn(3, 4, 64, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)
    )
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(_causal_attention(q, k, v, 0.0), ref, atol=2e-6)
    bf = _causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.0)
    assert bf.dtype == torch.bfloat16 and torch.allclose(bf.float(), ref, atol=0.05)


@requires("mlx")
def test_mlx_compiled_evaluation_follows_training(char_data):
    """The compiled forward takes the weights as inputs: after a train step it computes the
    new weights' loss, equal to the eager forward's."""
    be, model, x, y = _model_and_batch("mlx", char_data)
    before = be.eval_loss(model, x, y)
    assert before == pytest.approx(float(model.loss(be._tokens(x), be._tokens(y))), rel=1e-6)
    cfg = config.load(ROOT / "configs" / "shakespeare_char.toml", TINY)
    opt = be.make_optimizer(model, cfg.train)
    be.train_step(model, opt, [(x[:8], y[:8])], 1e-2, 1.0)
    after = be.eval_loss(model, x, y)
    model.eval()
    assert after != before
    assert after == pytest.approx(float(model.loss(be._tokens(x), be._tokens(y))), rel=1e-6)


def test_a_run_records_its_evaluation_precision(char_data, tmp_path):
    cfg = config.load(
        ROOT / "configs" / "shakespeare_char.toml",
        [*TINY, "max_iters=4", "eval_interval=2", f"data.dir={str(char_data)!r}",
         f"out={str(tmp_path)!r}", "dtype=auto", "eval_dtype=bf16", "threads=1"],
    )  # fmt: skip
    train.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["eval_dtype"] == "bf16"
    assert records[0]["dtype"] == get_backend("torch", "cpu").auto_dtype()
    evals = [r for r in records if r["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(e["eval_s"] > 0 for e in evals)


def test_an_unknown_evaluation_precision_is_a_clear_error(char_data, tmp_path):
    cfg = config.load(
        ROOT / "configs" / "shakespeare_char.toml",
        [*TINY, f"data.dir={str(char_data)!r}", f"out={str(tmp_path)!r}", "eval_dtype=int8"],
    )
    with pytest.raises(PolygptError, match="eval_dtype must be auto, fp32 or bf16"):
        train.train(cfg)
    cfg.train.eval_dtype, cfg.train.dtype = "auto", "fp16"
    with pytest.raises(PolygptError, match="train.dtype must be auto, fp32 or bf16"):
        train.train(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything was written
