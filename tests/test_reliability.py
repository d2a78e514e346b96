"""What a run meets besides kill -9 (tests/test_crash.py): a second run into the same --out, a
full disk or a read-only directory mid-run, and files that would run code when imported."""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import subprocess
import sys

import pytest
from click.testing import CliRunner

from polygpt import checkpoints, errors, rundir
from polygpt.backends import available_backends, get_backend
from polygpt.cli import main

from .conftest import ROOT, TINY, requires


def _train_args(char_data, out, *extra):
    return [
        "train",
        str(ROOT / "configs" / "shakespeare_char.toml"),
        *TINY,
        "eval_iters=2",
        "eval_interval=3",
        f"data.dir={str(char_data)!r}",
        "--backend",
        "torch",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def _error_line(result) -> str:
    """The CLI's error: exactly one line on stderr, exit 1, no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# --- two runs into one --out -------------------------------------------------------------------
HOLDER = """
import sys
from polygpt.rundir import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


@requires("torch")
def test_second_run_into_the_same_out_is_refused_and_a_killed_holder_leaves_no_stale_lock(
    tmp_path, char_data
):
    out = tmp_path / "ck"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        live_tmp = tmp_path / ".ck.tmp-live"  # what the running writer may be filling
        live_tmp.mkdir()
        r = CliRunner().invoke(main, _train_args(char_data, out, "max_iters=3"))
        line = _error_line(r)
        assert f"another run (pid {holder.pid}) is writing to {out}" in line
        assert live_tmp.exists() and not out.exists()  # the refused run touched nothing
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    assert rundir.lock_path(out).exists()  # the file stays, but the kernel dropped the lock
    r = CliRunner().invoke(main, _train_args(char_data, out, "max_iters=3"))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # lock file and temporary gone
    assert checkpoints.read(out).step == 3


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    out = tmp_path / "ck"
    refused = pytest.raises(errors.PolygptError, match=f"pid {os.getpid()}")
    with rundir.run_lock(out), refused, rundir.run_lock(out):
        pass
    with rundir.run_lock(out):  # released: taken again
        pass
    assert not rundir.lock_path(out).exists()


# --- disk full, no permission ------------------------------------------------------------------
@requires("torch")
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, char_data, monkeypatch, err):
    TorchBackend = type(get_backend("torch", "cpu"))  # noqa: N806 - a class

    out = tmp_path / "ck"
    real = TorchBackend.save_optimizer
    calls = []

    def save_optimizer(self, opt, path, metadata):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half the file, then the disk is full
            path.write_bytes(b"\0" * 1000)
            raise OSError(err, os.strerror(err))
        real(self, opt, path, metadata)

    monkeypatch.setattr(TorchBackend, "save_optimizer", save_optimizer)
    r = CliRunner().invoke(main, _train_args(char_data, out, "max_iters=9"))
    line = _error_line(r)
    assert line == (
        f"error: could not write the step 6 checkpoint to {out} ({os.strerror(err)}): "
        f"{out} still holds its step 3 checkpoint, unchanged"
    )
    ck = checkpoints.read(out)
    assert ck.step == 3 and ck.model.dtype == "F32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary, no lock left
    monkeypatch.setattr(TorchBackend, "save_optimizer", real)
    r = CliRunner().invoke(main, ["train", "--resume", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert checkpoints.read(out).step == 9


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
@requires("torch")
def test_read_only_output_directory(tmp_path, char_data):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        r = CliRunner().invoke(main, _train_args(char_data, parent / "ck", "max_iters=3"))
        assert "Permission denied" in _error_line(r)
    finally:
        parent.chmod(0o755)


def _limit_file_size(limit: int):
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG like a full disk would
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@requires("torch")
@pytest.mark.parametrize("backend", available_backends())
def test_real_writer_failure_mid_checkpoint(tmp_path, char_data, backend):
    """The writers themselves fail (safetensors for torch, mlx's own): a file size limit
    between the model and the optimizer file's size cuts the second checkpoint's optimizer
    file short in a separate process."""
    out = tmp_path / "ck"
    r = CliRunner().invoke(main, _train_args(char_data, out, "max_iters=3"))
    assert r.exit_code == 0, r.output
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    model = len(before[checkpoints.MODEL_FILE])
    assert len(before[checkpoints.OPTIMIZER_FILE]) > 1.5 * model
    p = subprocess.run(
        [sys.executable, "-m", "polygpt.cli", "train", "--resume", "--out", str(out)]
        + ["--backend", backend, "--device", "cpu", "--quiet", "max_iters=6"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=_limit_file_size(int(1.5 * model)),
        timeout=300,
    )
    assert p.returncode == 1, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not write the step 6"), p.stderr
    assert err[0].endswith(f"{out} still holds its step 3 checkpoint, unchanged")
    after = {f.name: f.read_bytes() for f in out.iterdir()}
    assert after.pop(checkpoints.METRICS_FILE).startswith(before.pop(checkpoints.METRICS_FILE))
    assert after == before  # the step 3 checkpoint, byte for byte (the log grew: steps 4-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# --- files that would run code -----------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hf_config() -> dict:
    return {
        "model_type": "gpt2",
        "vocab_size": 65,
        "n_positions": 32,
        "n_embd": 16,
        "n_layer": 1,
        "n_head": 2,
        "activation_function": "gelu_new",
    }


@requires("torch")
def test_hf_pickle_only_directory_is_refused(tmp_path, char_data):
    marker = tmp_path / "pwned"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(_hf_config()))
    with open(hf / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Evil(marker)}, f)
    r = CliRunner().invoke(
        main, ["convert", str(hf), str(tmp_path / "out"), "--tokenizer", str(char_data)]
    )
    assert "pytorch_model.bin, a pickle" in _error_line(r)
    assert not marker.exists() and not (tmp_path / "out").exists()


@requires("torch")
def test_nanogpt_pickle_that_calls_os_system_never_runs(tmp_path, char_data):
    import torch

    marker = tmp_path / "pwned"
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=False, vocab_size=65)
    for i, payload in enumerate(
        [
            {"model": _Evil(marker), "model_args": args},
            {"model": {}, "model_args": args, "config": _Evil(marker)},  # hidden in a side field
        ]
    ):
        bad = tmp_path / f"ckpt{i}.pt"
        torch.save(payload, bad, pickle_module=pickle)
        r = CliRunner().invoke(
            main, ["convert", str(bad), str(tmp_path / "out"), "--tokenizer", str(char_data)]
        )
        assert "cannot read" in _error_line(r)
        assert not marker.exists() and not (tmp_path / "out").exists()
    # unpickled without weights_only, the payload does run: the test proves something
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()
