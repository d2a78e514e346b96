"""Data parallelism on the real launchers: 2 processes on localhost (CPU) against 1 process.

torchrun (DDP over gloo) and mlx.launch (ring) each train 20 AdamW steps with clipping and
grad_accum=2 on the same global batch as a one-process run: every step's loss and the final
weights agree within 1e-5; only rank 0 writes, and the checkpoint is the one-process checkpoint
(same files, headers, config) up to float rounding and timings; a 2-process checkpoint resumes
in one process, in either backend, on the one-process trajectory. A dead or stopped peer ends
the run with a one-line error instead of a hang. Every launch is bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from polygpt import checkpoints, distributed, metrics_log, rundir
from polygpt.errors import PolygptError
from polygpt.train import config_for_resume, train

from .conftest import ROOT, TINY, requires, tiny_config

LAUNCH_TIMEOUT = 300  # seconds per launch: a hang fails the test instead of the suite
RUN = [
    "max_iters=20",
    "eval_interval=10",
    "log_interval=1",
    "grad_accum=2",
    "grad_clip=0.1",  # small enough to clip every step: clipping before averaging would show
    "eval_iters=2",
    "threads=1",
]
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MLX_RANK")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["POLYGPT_DIST_TIMEOUT"] = "120"
    env.update(extra)
    return env


def _free_port_pair() -> int:
    """A port p with p and p+1 free (mlx.launch's ring listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def _command(launcher: str, args: list[str], nproc: int = 2) -> list[str]:
    if launcher == "torchrun":
        head = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        return [sys.executable, *head, "-m", "polygpt", "train", *args, "--backend", "torch"]
    launch = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
    head = ["-c", launch, "-n", str(nproc), "--starting-port", str(_free_port_pair())]
    tail = ["--", "-m", "polygpt", "train", *args, "--backend", "mlx"]
    return [sys.executable, *head, "--python", sys.executable, *tail]


def _args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "configs" / "shakespeare_char.toml"),
        *TINY,
        f"data.dir={str(data_dir)!r}",
        f"train.out={str(out)!r}",
        "device=cpu",
        *RUN,
        *extra,
        "-q",
    ]


def _launch(launcher: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        _command(launcher, args),
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )


def _quiet(s: str) -> None:
    pass


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_log.read(out) if r["event"] == "train"}


def _header(raw: bytes) -> dict:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])


def _assert_same_run(a: Path, b: Path, atol: float = 1e-5, steps=None) -> None:
    la, lb = _losses(a), _losses(b)
    steps = steps or sorted(la)
    assert all(s in lb for s in steps), f"steps {sorted(lb)} lack some of {steps}"
    d = max(abs(la[s] - lb[s]) for s in steps)
    assert d <= atol, f"per-step losses differ by up to {d:.3g}"
    wa, wb = load_file(str(a / checkpoints.MODEL_FILE)), load_file(str(b / checkpoints.MODEL_FILE))
    assert wa.keys() == wb.keys()
    d = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
    assert d <= atol, f"final weights differ by up to {d:.3g}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, char_data):
    """One-process reference runs (20 and 30 steps) per backend, trained in this process."""
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for backend in ("torch", "mlx"):
        if backend not in distributed_backends():
            continue
        for n in (20, 30):
            d = root / f"{backend}-1proc-{n}"
            cfg = tiny_config(char_data, d, *RUN, f"max_iters={n}", backend=backend)
            train(cfg)
            out[backend, n] = d
    return root, out


def distributed_backends() -> list[str]:
    from polygpt.backends import available_backends

    return available_backends()


@pytest.fixture(scope="module")
def launched(runs, char_data):
    """Each launcher's 2-process 20-step run, started once for the tests below."""
    root, _ = runs
    done = {}

    def get(launcher: str) -> tuple[Path, subprocess.CompletedProcess, Path]:
        if launcher not in done:
            cwd = root / f"{launcher}-cwd"
            out = root / f"{launcher}-2proc" / "run"
            res = _launch(launcher, _args(char_data, out), cwd)
            assert "Traceback" not in res.stderr, res.stderr
            assert (out / checkpoints.CONFIG_FILE).exists(), res.stdout + res.stderr
            done[launcher] = out, res, cwd
        return done[launcher]

    return get


LAUNCHERS = [
    pytest.param("torchrun", "torch", "gloo", marks=requires("torch")),
    pytest.param("mlx.launch", "mlx", "ring", marks=requires("mlx")),
]


@pytest.mark.parametrize("launcher,backend,dist_backend", LAUNCHERS)
def test_two_processes_follow_the_one_process_run(runs, launched, launcher, backend, dist_backend):
    _, ref = runs
    out, res, _ = launched(launcher)
    assert res.returncode == 0, res.stderr
    _assert_same_run(ref[backend, 20], out)
    # rank 0 alone reported: one start line, one checkpoint line, each step logged once
    assert res.stdout.count("2 processes") == 1, res.stdout
    assert f"over {dist_backend}" in res.stdout
    assert res.stdout.count("checkpoint:") == 1, res.stdout
    rows = metrics_log.read(out)
    assert [r["step"] for r in rows if r["event"] == "train"] == list(range(1, 21))
    assert [r["step"] for r in rows if r["event"] == "eval"] == [0, 10, 20]
    start = [r for r in rows if r["event"] == "start"]
    assert start == [{**start[0], "step": 0, "world_size": 2, "dist_backend": dist_backend}]


@pytest.mark.parametrize("launcher,backend,dist_backend", LAUNCHERS)
def test_only_rank0_writes_the_one_process_checkpoint(
    runs, launched, launcher, backend, dist_backend
):
    _, ref = runs
    out, _, cwd = launched(launcher)
    one = ref[backend, 20]
    # no temporaries left over (the run lock, rank 0's, lives beside the directory)
    lock = rundir.lock_path(out).name
    assert sorted(p.name for p in out.parent.iterdir() if p.name != lock) == ["run"]
    assert list(cwd.iterdir()) == []  # nothing written where the processes ran
    assert checkpoints.dir_size(out).keys() == checkpoints.dir_size(one).keys()
    assert (out / checkpoints.TOKENIZER_FILE).read_bytes() == (
        one / checkpoints.TOKENIZER_FILE
    ).read_bytes()
    for name in (checkpoints.MODEL_FILE, checkpoints.OPTIMIZER_FILE):
        # same header (names, dtypes, shapes, offsets, metadata) and size; safetensors writes
        # the metadata in hash order, so two one-process runs differ in its byte order too
        a, b = (one / name).read_bytes(), (out / name).read_bytes()
        assert len(a) == len(b) and _header(a) == _header(b), name
    # config.json: no trace of the world size; equal but for timings, the output path and
    # the float rounding of the evaluated losses
    ca, cb = (json.loads((d / checkpoints.CONFIG_FILE).read_text()) for d in (one, out))
    for c in (ca, cb):
        c.pop("saved_at")
        c["run"]["train"].pop("out")
    ma, mb = ca.pop("metrics"), cb.pop("metrics")
    assert ca == cb
    assert ma.keys() == mb.keys() and all(abs(ma[k] - mb[k]) < 1e-4 for k in ma)
    assert "world_size" not in (out / checkpoints.CONFIG_FILE).read_text()


@pytest.mark.parametrize("launcher,backend,dist_backend", LAUNCHERS)
@pytest.mark.parametrize("resume_in", ["torch", "mlx"])
def test_two_process_checkpoint_resumes_in_one_process(
    runs, launched, tmp_path, launcher, backend, dist_backend, resume_in
):
    if resume_in not in distributed_backends():
        pytest.skip(f"{resume_in} is not installed")
    _, ref = runs
    out, _, _ = launched(launcher)
    part = tmp_path / "part"
    shutil.copytree(out, part)
    cfg = config_for_resume(part, ["max_iters=30"])
    cfg.train.backend = resume_in
    train(cfg, resume=True)
    # the same backend continues the one-process run to 1e-5; the other one to its parity
    # tolerance (DESIGN.md: 1e-4 relative per step)
    tol = 1e-5 if resume_in == backend else 5e-4
    _assert_same_run(ref[backend, 30], part, atol=tol, steps=list(range(21, 31)))
    start = [r for r in metrics_log.read(part) if r["event"] == "start"]
    assert [(r["step"], r["world_size"]) for r in start] == [(0, 2), (20, 1)]


# -- errors ---------------------------------------------------------------------------------
def test_launcher_detection_and_batch_check():
    assert distributed.detect_launcher({}) is None
    assert distributed.detect_launcher({"RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"
    assert distributed.detect_launcher({"MLX_RANK": "1", "MLX_HOSTFILE": "/h"}) == "mlx.launch"
    assert distributed.detect_launcher({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpirun"
    distributed.check_batch(8, 2)
    with pytest.raises(PolygptError, match="multiple of the 3 processes"):
        distributed.check_batch(8, 3)


def test_each_rank_takes_its_contiguous_slice_of_the_global_batch():
    x = np.arange(8 * 3).reshape(8, 3)
    batches = [(x, x + 1), (x + 2, x + 3)]
    assert distributed.World().shard(batches) is batches
    got = distributed.World(rank=1, size=2).shard(batches)
    for (gx, gy), (bx, by) in zip(got, batches):
        np.testing.assert_array_equal(gx, bx[4:])
        np.testing.assert_array_equal(gy, by[4:])
    parts = [distributed.World(rank=r, size=4).shard(batches)[0][0] for r in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), x)


@pytest.mark.parametrize(
    "env,backend,match",
    [
        pytest.param(
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
            "mlx",
            "started by torchrun, which runs the torch backend",
            marks=requires("mlx"),
        ),
        pytest.param(
            {"MLX_RANK": "0", "MLX_HOSTFILE": "/nonexistent"},
            "torch",
            "started by mlx.launch, which runs the mlx backend",
            marks=requires("torch"),
        ),
    ],
)
def test_launcher_for_the_other_framework_is_an_error(
    monkeypatch, tmp_path, char_data, env, backend, match
):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = tiny_config(char_data, tmp_path / "out", backend=backend)
    with pytest.raises(PolygptError, match=match):
        train(cfg)
    assert not (tmp_path / "out").exists()


@requires("torch")
def test_world_size_must_divide_the_batch(tmp_path, char_data):
    res = _launch("torchrun", _args(char_data, tmp_path / "out", "batch_size=7"), tmp_path / "cwd")
    assert res.returncode != 0
    errors = _error_lines(res.stderr)
    assert errors and all("multiple of the 2 processes" in e for e in errors), res.stderr
    assert not (tmp_path / "out").exists()


def _error_lines(stderr: str) -> list[str]:
    """polygpt's `error:` lines; mlx.launch writes its own warnings from another thread, so one
    may begin mid-line."""
    return [line[line.index("error: ") :] for line in stderr.splitlines() if "error: " in line]


def _children(pid: int) -> list[int]:
    out = []  # every thread's children: mlx.launch starts the ranks from threads
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _rank_pid(launcher_pid: int, rank: int, var: str) -> int | None:
    """The pid of the process with `var`=rank among the launcher's descendants (Linux)."""
    todo, seen = [launcher_pid], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += _children(pid)
    for pid in seen:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            f"{var}={rank}".encode() in env
            and b"polygpt" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ):
            return pid
    return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _training(
    launcher: str, char_data: Path, out: Path, cwd: Path, timeout: str = "120"
) -> subprocess.Popen:
    """A 2-process run, returned once its first checkpoint exists (training runs). `timeout`
    (POLYGPT_DIST_TIMEOUT) is long by default: a wait that outlives it is a failure, and no
    step, evaluation or checkpoint of the tiny model comes near it even on a loaded machine."""
    args = _args(char_data, out, "max_iters=100000", "eval_interval=20", "log_interval=5")
    proc = subprocess.Popen(
        _command(launcher, args),
        cwd=cwd,
        env=_env(POLYGPT_DIST_TIMEOUT=timeout),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while not (out / checkpoints.CONFIG_FILE).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
    except BaseException:
        _end(proc)
        raise
    return proc


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@requires("torch")
def test_a_launcher_stopping_the_job_leaves_each_rank_s_error_line(tmp_path, char_data):
    """SIGTERM to torchrun (a cancelled job; torchrun also sends it to the survivors of a failed
    peer): every rank says it was stopped, and the last checkpoint is whole."""
    out = tmp_path / "out"
    proc = _training("torchrun", char_data, out, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        _end(proc)
    resume = f"torchrun --nproc_per_node=2 -m polygpt train --resume --out {out} --backend torch"
    _assert_stopped(stderr, out, "torchrun", resume)


def _assert_stopped(stderr: str, out: Path, launcher: str, resume: str) -> None:
    """Each rank's error line says what stopped it, where the checkpoint is and the command that
    resumes it. A rank may see its peer's exit in a collective before its own SIGTERM: then its
    line says a peer failed; the first rank to go says it was stopped."""
    errors = _error_lines(stderr)
    ckpt = checkpoints.read(out)
    assert ckpt.optimizer_file.exists()
    for rank in (0, 1):
        mine = [e for e in errors if f"rank {rank}/2: " in e]
        assert mine and all(e.endswith(f"; resume with: {resume}") for e in mine), stderr
    assert any(f"stopped by {launcher} (SIGTERM" in e for e in errors), stderr
    # rank 0 finishes a checkpoint write before it stops, and names the step on disk
    assert f"{out} holds the checkpoint of step {ckpt.step}; resume with" in stderr, stderr


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@requires("mlx")
def test_a_sigterm_to_each_mlx_rank_leaves_its_error_line(tmp_path, char_data):
    """mlx.launch's ranks meet SIGTERM from a job scheduler (or a user's kill): each says it
    was stopped, where the checkpoint is and how to resume, and the checkpoint is whole."""
    out = tmp_path / "out"
    proc = _training("mlx.launch", char_data, out, tmp_path)
    try:
        ranks = [_rank_pid(proc.pid, r, "MLX_RANK") for r in (0, 1)]
        assert None not in ranks
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        _end(proc)
    resume = f"mlx.launch -n 2 --python PYTHON -- -m polygpt train --resume --out {out}"
    _assert_stopped(stderr, out, "mlx.launch", f"{resume} --backend mlx")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    "launcher,var,sig,timeout,expect",
    [
        pytest.param(
            "torchrun",
            "RANK",
            signal.SIGKILL,
            "120",  # gloo sees the dead peer's closed socket: no wait runs out
            "a peer process failed",
            marks=requires("torch"),
        ),
        pytest.param(
            "mlx.launch",
            "MLX_RANK",
            signal.SIGSTOP,
            # a stopped peer keeps its socket open: only the limit ends rank 0's wait, so it is
            # as short as keeps a loaded machine's evaluation and checkpoint well inside it
            "10",
            "timed out after 10s",
            marks=requires("mlx"),
        ),
    ],
)
def test_a_dead_or_stopped_peer_is_an_error_not_a_hang(
    tmp_path, char_data, launcher, var, sig, timeout, expect
):
    out = tmp_path / "out"
    proc = _training(launcher, char_data, out, tmp_path, timeout)
    victim = None
    try:
        main, victim = _rank_pid(proc.pid, 0, var), _rank_pid(proc.pid, 1, var)
        assert main is not None and victim is not None
        os.kill(victim, sig)
        if sig == signal.SIGSTOP:  # a stopped process ignores the launcher's SIGTERM: once
            deadline = time.monotonic() + LAUNCH_TIMEOUT
            while _alive(main):  # rank 0 has given up, end it as a user would
                assert time.monotonic() < deadline
                time.sleep(0.2)
            os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        if victim is not None and sig == signal.SIGSTOP:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        _end(proc)
    # rank 0 either sees the dead peer in a collective, or torchrun's SIGTERM reaches it first
    # (torchrun stops the survivors at once): both say so in one line
    errors = _error_lines(stderr)
    mine = [e for e in errors if expect in e and "rank 0/2" in e]
    assert mine, stderr
    # the last checkpoint is whole: it loads and resumes, and the line names it
    ckpt = checkpoints.read(out)
    assert ckpt.step % 20 == 0 and ckpt.optimizer_file.exists()
    assert f"{out} holds the checkpoint of step {ckpt.step}; resume with: " in mine[0], stderr
    lock = rundir.lock_path(out).name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) in ([], [lock])
