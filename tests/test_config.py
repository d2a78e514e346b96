import pytest

from polygpt import config
from polygpt.errors import PolygptError

from .conftest import ROOT

REF = ROOT / "configs" / "shakespeare_char.toml"


def test_reference_config_defaults():
    cfg = config.load(REF)
    assert (cfg.model.block_size, cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (
        64,
        4,
        4,
        128,
    )
    assert cfg.train.batch_size == 12 and cfg.train.max_iters == 2000
    assert cfg.train.lr == 1e-3 and cfg.train.min_lr == 1e-4 and cfg.train.beta2 == 0.99
    assert cfg.model.to_spec(65).num_params() == 795_904


def test_overrides_full_and_bare_names():
    cfg = config.load(REF, ["train.max_iters=10", "lr=3e-4", "bias=true", "out='x/y'"])
    assert cfg.train.max_iters == 10 and cfg.train.lr == 3e-4 and cfg.model.bias is True
    assert cfg.train.out == "x/y"
    cfg = config.load(REF, ["out=weights/bare", "prompt=ROMEO:"])  # unquoted strings
    assert cfg.train.out == "weights/bare" and cfg.sample.prompt == "ROMEO:"


@pytest.mark.parametrize(
    "override, words",
    [
        ("max_iter=10", "unknown config key 'max_iter'"),
        ("train.nope=1", "unknown config key train.nope"),
        ("max_iters=ten", "train.max_iters.*expects int"),
        ("bias=3", "model.bias.*expects bool"),
        ("seed=1", "ambiguous"),
        ("max_iters", "key=value"),
    ],
)
def test_override_errors_name_the_key(override, words):
    with pytest.raises(PolygptError, match=words):
        config.load(REF, [override])


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_iterz = 5\n")
    with pytest.raises(PolygptError, match="train.max_iterz"):
        config.load(bad)
    bad.write_text("[train\n")
    with pytest.raises(PolygptError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(PolygptError, match="cannot read config"):
        config.load(tmp_path / "missing.toml")
    bad.write_text("[optimizer]\nlr = 1\n")
    with pytest.raises(PolygptError, match="unknown config section"):
        config.load(bad)
