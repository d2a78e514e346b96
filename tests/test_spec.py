import pytest

from polygpt.errors import PolygptError
from polygpt.spec import ModelSpec


def test_reference_counts_match_nanogpt():
    spec = ModelSpec(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    assert spec.num_params() == 795_904
    assert spec.num_params(non_embedding=False) == 804_096
    # the blog's 802,944: nanoGPT's weight-decayed 2-D tensors (total minus LayerNorm weights)
    shapes = spec.param_shapes()
    decayed = sum(_n(shapes[n]) for n in spec.decayed_params())
    assert decayed == 802_944


def test_names_order_and_shapes():
    spec = ModelSpec(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=4, bias=True)
    names = list(spec.param_shapes())
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert names[-2:] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert spec.param_shapes()["transformer.h.1.attn.c_attn.weight"] == (12, 4)
    assert spec.param_shapes()["transformer.h.0.mlp.c_proj.weight"] == (4, 16)
    assert "lm_head.weight" not in names  # tied, stored once
    assert len(spec.residual_projections()) == 4
    nobias = ModelSpec(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=4)
    assert not any(n.endswith(".bias") for n in nobias.param_shapes())


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n_embd": 130, "n_head": 4}, "divisible"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"dropout": 1.5}, "dropout"),
        ({"activation": "relu"}, "activation"),
        ({"block_size": 2.5}, "block_size"),
    ],
)
def test_validation(kwargs, words):
    with pytest.raises(PolygptError, match=words):
        ModelSpec(**kwargs)


def test_json_round_trip_and_unknown_key():
    spec = ModelSpec(bias=True, activation="gelu")
    assert ModelSpec.from_json(spec.to_json()) == spec
    with pytest.raises(PolygptError, match="n_embed"):
        ModelSpec.from_dict({"n_embed": 3})


def test_flops_per_token():
    spec = ModelSpec()
    n = spec.num_params()
    assert spec.flops_per_token() == 6 * n + 12 * 4 * 128 * 64
    assert spec.flops_per_token(training=False) == (6 * n + 12 * 4 * 128 * 64) // 3


def _n(shape):
    out = 1
    for s in shape:
        out *= s
    return out
