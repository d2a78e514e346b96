"""The command line end to end (click's CliRunner): happy paths and one-line errors."""

import pytest
from click.testing import CliRunner

from polygpt.cli import main

from .conftest import ROOT, SHAKESPEARE, TINY


def run(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def assert_one_line_error(res, words):
    assert res.exit_code != 0
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), res.output
    assert words in lines[-1], lines[-1]
    assert "Traceback" not in res.output


def test_help_lists_commands():
    out = run("--help").output
    for cmd in ("prepare", "train", "sample", "info"):
        assert cmd in out


def test_prepare_train_sample_info(tmp_path):
    if not SHAKESPEARE.exists():
        pytest.skip("corpus not available")
    d = tmp_path / "data"
    out = run("prepare", "shakespeare-char", "--input", SHAKESPEARE, "--out", d).output
    assert "1,003,854 train / 111,540 val tokens, vocab 65" in out
    ck = tmp_path / "ck"
    out = run(
        "train",
        ROOT / "configs/shakespeare_char.toml",
        *TINY,
        "max_iters=10",
        "eval_interval=10",
        f"data.dir={d}",
        "--out",
        ck,
        "--quiet",
    ).output
    assert "step 10: train loss" in out and f"checkpoint: {ck}" in out
    out = run("sample", ck, "--prompt", "KING:", "-n", "30", "--seed", "3").output
    assert out.startswith("KING:") and len(out.rstrip("\n")) >= 30
    again = run("sample", ck, "--prompt", "KING:", "-n", "30", "--seed", "3").output
    assert again == out
    out = run("info", ck).output
    assert "step        10" in out and "model.safetensors" in out
    # --resume continues from the saved step
    out = run("train", "--resume", "--out", ck, "max_iters=20", "--quiet").output
    assert "resuming" in out and "step 20:" in out and "(step 20," in out


@pytest.mark.parametrize(
    "args, words",
    [
        (["sample", "/nonexistent/ckpt"], "does not exist"),
        (["info", "/nonexistent/ckpt"], "does not exist"),
        (["train", "configs/shakespeare_char.toml", "max_iter=5"], "unknown config key"),
        (["train", "/nonexistent.toml"], "cannot read config"),
        (["train", "--resume", "--out", "/nonexistent/run"], "does not exist"),
        (["train", "configs/shakespeare_char.toml", "--backend", "jax"], "unknown backend"),
        (
            ["prepare", "shakespeare-char", "--input", "/nonexistent.txt", "--out", "/tmp/x"],
            "not found",
        ),
    ],
)
def test_user_errors_are_one_line(args, words, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert_one_line_error(run(*args, ok=False), words)


def test_sample_errors(tiny_ckpt):
    assert_one_line_error(
        run("sample", tiny_ckpt, "--prompt", "caf\u00e9", ok=False), "not in the model's vocabulary"
    )
    assert_one_line_error(
        run("sample", tiny_ckpt, "--prompt", "x" * 33, ok=False), "longer than the model's context"
    )
    assert_one_line_error(run("sample", tiny_ckpt, "--precision", "fp8", ok=False), "fp8")
    assert_one_line_error(
        run("sample", tiny_ckpt, "--device", "cuda", "--backend", "torch", ok=False),
        "not available",
    )


def test_corrupt_checkpoint_is_one_line(tiny_ckpt, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    raw = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(raw[:1000])
    assert_one_line_error(run("sample", ck, ok=False), "not a valid safetensors")
    assert_one_line_error(run("info", ck, ok=False), "not a valid safetensors")
    assert (ck / "model.safetensors").read_bytes() == raw[:1000]  # nothing rewritten


def test_missing_framework_is_one_line(tiny_ckpt, monkeypatch):
    import importlib.util

    from polygpt.backends import base

    real = importlib.util.find_spec
    monkeypatch.setattr(
        base.importlib.util, "find_spec", lambda n, *a: None if n == "mlx" else real(n, *a)
    )
    assert_one_line_error(
        run("sample", tiny_ckpt, "--backend", "mlx", ok=False), "pip install 'polygpt[mlx]'"
    )
