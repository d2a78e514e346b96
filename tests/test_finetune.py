"""init_from: fine-tuning starts from a checkpoint's weights and spec, with a fresh optimizer."""

import pytest

from polygpt import checkpoints, metrics_log
from polygpt.errors import PolygptError
from polygpt.train import train

from .conftest import backends_under_test, tiny_config


@pytest.mark.parametrize("backend", backends_under_test())
def test_finetune_from_checkpoint_loss_falls(backend, tiny_ckpt, char_data, tmp_path):
    base = checkpoints.read(tiny_ckpt)
    out = tmp_path / "ft"
    cfg = tiny_config(
        char_data,
        out,
        f"init_from={str(tiny_ckpt)!r}",
        "n_layer=1",  # ignored: the spec comes from the checkpoint
        "max_iters=40",
        "eval_interval=20",
        "warmup_iters=0",
        backend=backend,
    )
    train(cfg)
    rows = [r for r in metrics_log.read(out) if r["event"] == "eval"]
    # step 0 is the checkpoint itself: the same eval batches give its last val loss again
    assert rows[0]["val_loss"] == pytest.approx(base.config["metrics"]["val_loss"], abs=1e-4)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.1
    ft = checkpoints.read(out)
    assert ft.spec == base.spec and ft.step == 40
    assert ft.config["run"]["train"]["init_from"] == str(tiny_ckpt)


def test_finetune_needs_the_checkpoints_vocabulary(tiny_ckpt, tmp_path):
    from polygpt import data

    other = tmp_path / "abc"
    data.prepare_char("abcabcabc " * 200, other)
    cfg = tiny_config(other, tmp_path / "ft", f"init_from={str(tiny_ckpt)!r}")
    with pytest.raises(PolygptError, match="uses another vocabulary"):
        train(cfg)
    cfg = tiny_config(other, tmp_path / "ft", f"init_from={str(tmp_path / 'none')!r}")
    with pytest.raises(PolygptError):
        train(cfg)
