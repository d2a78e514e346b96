"""Shared fixtures: a slice of the real tinyshakespeare corpus, prepared data and a tiny trained
checkpoint.

The slice (tests/data/shakespeare_slice.txt) is committed, so every clone runs the same tests on
the same text: the corpus's first ~200 KB, whole paragraphs, and the three paragraphs that hold
the characters those lack (`$`, `3`, `X`), so the vocabulary is the corpus's 65 characters.

Backends are chosen from POLYGPT_TEST_BACKENDS (default: every known one) and a backend whose
framework is not installed is skipped with the reason, as einops' tests do.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from polygpt import config, data
from polygpt.backends import available_backends, known_backends

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "tests" / "data" / "shakespeare_slice.txt"

# A model small enough that a training step takes milliseconds, trained in fp32 (the default,
# `auto`, is bf16 on CPUs with bf16 dot products: tests that compare numbers want one precision
# on every machine).
TINY = [
    "dtype=fp32",
    "n_layer=2",
    "n_head=2",
    "n_embd=32",
    "block_size=32",
    "batch_size=8",
    "eval_iters=5",
    "log_interval=5",
    "warmup_iters=5",
]


def backends_under_test() -> list:
    wanted = os.environ.get("POLYGPT_TEST_BACKENDS")
    names = wanted.split(",") if wanted else known_backends()
    avail = set(available_backends())
    return [
        pytest.param(n, marks=pytest.mark.skipif(n not in avail, reason=f"{n} is not installed"))
        for n in names
    ]


def requires(*names: str):
    missing = [n for n in names if n not in available_backends()]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (not installed)")


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shakespeare_text) -> Path:
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    data.prepare_char(shakespeare_text, out)
    return out


def tiny_config(data_dir: Path, out: Path, *extra: str, backend: str = "torch"):
    return config.load(
        ROOT / "configs" / "shakespeare_char.toml",
        [
            *TINY,
            f"data.dir={str(data_dir)!r}",
            f"train.out={str(out)!r}",
            f"train.backend={backend!r}",
            "device=cpu",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, char_data) -> Path:
    """A torch checkpoint of a tiny model trained for 60 real steps."""
    if "torch" not in available_backends():
        pytest.skip("torch is not installed")
    from polygpt.train import train

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    cfg = tiny_config(char_data, out, "max_iters=60", "eval_interval=30")
    train(cfg)
    return out


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory, char_data) -> Path:
    """A torch checkpoint of the tiny model at initialization (no training step): for tests of
    formats and plumbing, where what the weights learned does not matter."""
    if "torch" not in available_backends():
        pytest.skip("torch is not installed")
    from polygpt import train

    out = tmp_path_factory.mktemp("ckpt") / "random"
    run = train.setup(tiny_config(char_data, out, "max_iters=0"))
    train.save(run, 0)
    return out
