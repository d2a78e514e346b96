"""Real (tiny) training runs: the loss falls, checkpoints load, --resume continues the run."""

import math

import numpy as np
import pytest

from polygpt import checkpoints, inference, metrics_log
from polygpt.config import TrainConfig
from polygpt.errors import PolygptError
from polygpt.generate import GenerationConfig
from polygpt.train import config_for_resume, get_lr, train

from .conftest import tiny_config


def test_lr_schedule_matches_nanogpt():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000)
    assert get_lr(0, cfg) == pytest.approx(1e-3 / 101)
    assert get_lr(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert get_lr(100, cfg) == pytest.approx(1e-3)
    assert get_lr(1050, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert get_lr(2000, cfg) == pytest.approx(1e-4)
    assert get_lr(5000, cfg) == 1e-4


def test_tiny_training_loss_falls(tiny_ckpt):
    rows = [r for r in metrics_log.read(tiny_ckpt) if r["event"] == "eval"]
    assert [r["step"] for r in rows] == [0, 30, 60]
    assert rows[0]["val_loss"] == pytest.approx(math.log(65), abs=0.15)  # uniform at init
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.6
    ckpt = checkpoints.read(tiny_ckpt)
    assert ckpt.step == 60 and ckpt.optimizer_file.exists()
    assert ckpt.config["metrics"]["val_loss"] == rows[-1]["val_loss"]


def test_sampling_is_in_vocab_and_seeded(tiny_ckpt):
    lm = inference.load(tiny_ckpt, backend="torch", device="cpu")
    cfg = GenerationConfig(max_new_tokens=80, temperature=1.0, seed=5)
    a = lm.generate(["ROMEO:"], cfg)[0]
    b = lm.generate(["ROMEO:"], cfg)[0]
    c = lm.generate(["ROMEO:"], GenerationConfig(max_new_tokens=80, temperature=1.0, seed=6))[0]
    assert a == b and a != c and len(a) == 80
    assert set(a) <= set(lm.tokenizer.chars)


def test_resume_continues_from_saved_step(tmp_path, char_data):
    full = tiny_config(char_data, tmp_path / "full", "max_iters=20", "eval_interval=10")
    train(full)
    part = tiny_config(char_data, tmp_path / "part", "max_iters=10", "eval_interval=10")
    train(part)
    assert checkpoints.read(tmp_path / "part").step == 10
    cfg = config_for_resume(tmp_path / "part", ["max_iters=20"])
    res = train(cfg, resume=True)
    assert res.step == 20
    # same batches, same schedule, same optimizer state: the resumed run is the unbroken run
    a = checkpoints.read(tmp_path / "full").config["metrics"]
    b = checkpoints.read(tmp_path / "part").config["metrics"]
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    lm_a = inference.load(tmp_path / "full", backend="torch", device="cpu")
    lm_b = inference.load(tmp_path / "part", backend="torch", device="cpu")
    x = np.arange(32)[None] % 65
    np.testing.assert_allclose(
        lm_a.backend.logits(lm_a.model, x), lm_b.backend.logits(lm_b.model, x), atol=1e-5
    )


def test_refuses_to_clobber_and_resume_needs_a_run(tmp_path, char_data, tiny_ckpt):
    cfg = tiny_config(char_data, tiny_ckpt, "max_iters=5")
    with pytest.raises(PolygptError, match="already holds a checkpoint"):
        train(cfg)
    with pytest.raises(PolygptError, match="does not exist"):
        config_for_resume(tmp_path / "nothing", [])
