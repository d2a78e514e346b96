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
    d = tmp_path / "data"
    out = run("prepare", "shakespeare-char", "--input", SHAKESPEARE, "--out", d).output
    assert "180,906 train / 20,101 val tokens, vocab 65" in out
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


def test_long_prompt_keeps_its_last_block_size_tokens(tiny_ckpt):
    """nanoGPT and llama.cpp behaviour: crop to the context, with one note on stderr."""
    args = ("sample", tiny_ckpt, "-n", "20", "--temperature", "0")
    long = run(*args, "--prompt", "ab" * 16 + "x" * 32)
    assert "note: the prompt is 64 tokens, longer than the context" in long.stderr
    assert long.stdout.startswith("ab" * 16 + "x" * 32)
    tail = run(*args, "--prompt", "x" * 32)
    assert long.stdout[64:] == tail.stdout[32:]  # the same text as from the last 32 tokens alone
    assert "note:" not in tail.stderr


def test_resume_refuses_model_overrides(tiny_ckpt):
    res = run("train", "--resume", "--out", tiny_ckpt, "n_layer=3", ok=False)
    assert_one_line_error(res, "model.n_layer cannot change on --resume")
    res = run("train", "--resume", "--out", tiny_ckpt, "model.n_embd=64", ok=False)
    assert_one_line_error(res, "model.n_embd cannot change on --resume")


def test_sample_uses_the_run_config_sample_section(tiny_ckpt, tmp_path):
    """Options not given come from the checkpoint's [sample] section."""
    import json
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["run"]["sample"].update(prompt="KING:", max_new_tokens=7, temperature=0.0)
    (ck / "config.json").write_text(json.dumps(cfg))
    out = run("sample", ck).stdout
    assert out.startswith("KING:")
    assert out == run("sample", ck, "--prompt", "KING:", "-n", "7", "-t", "0").stdout
    explicit = run("sample", ck, "-n", "3", "--prompt", "KING:", "-t", "0").stdout
    assert run("sample", ck, "-n", "3").stdout == explicit  # the other keys still from [sample]


def test_ctrl_c_says_where_it_stopped_and_how_to_resume(tmp_path, char_data, monkeypatch):
    """Exit 130 with one line (the step reached, the step on disk, the resume command) and no
    traceback; nothing is saved on interrupt, and --resume finishes the run."""
    from polygpt import train as train_mod

    draw, calls = train_mod.draw_batches, []

    def interrupt_at_step_13(run_):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return draw(run_)

    monkeypatch.setattr(train_mod, "draw_batches", interrupt_at_step_13)
    ck = tmp_path / "ck"
    args = [ROOT / "configs/shakespeare_char.toml", *TINY, f"data.dir={char_data}"]
    res = run("train", *args, "max_iters=20", "eval_interval=10", "--out", ck, ok=False)
    assert res.exit_code == 130 and "Traceback" not in res.output
    last = res.stderr.strip().splitlines()[-1]
    assert last == (
        f"interrupted at step 12: {ck} holds the checkpoint of step 10; "
        f"resume with: polygpt train --resume --out {ck}"
    )
    assert "step 10: train loss" in res.stdout  # no bar: stderr is not a terminal here
    assert "\r" not in res.stderr
    monkeypatch.setattr(train_mod, "draw_batches", draw)
    out = run("train", "--resume", "--out", ck).stdout
    assert "resuming" in out and "(step 20," in out
