"""kill -9 in the middle of a run's writes: the checkpoint on disk stays whole and consistent,
a killed run's leftovers are cleaned at the next start, and --resume ends bit for bit where an
unbroken run ends.

The kills are deterministic (polygpt.faults): the run process cuts the file it just wrote at a
seeded fraction (what an interrupted write leaves) and sends itself SIGKILL at a chosen point of
a chosen checkpoint: inside model.safetensors, between it and optimizer.safetensors, inside the
optimizer file, inside config.json, between the two directory renames, after them, and inside a
metrics.jsonl line. One process imports torch once and forks a child per trial, so the 13 runs
cost one import.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from polygpt import checkpoints, metrics_log
from polygpt.backends import available_backends, get_backend
from polygpt.cli import main
from polygpt.config import TrainConfig

from .conftest import ROOT, TINY, requires

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")

# 12 steps, a checkpoint every 3 (4 checkpoints), a metrics line every step: 12 train + 5 eval
RUN = [
    *TINY,
    "max_iters=12",
    "eval_interval=3",
    "log_interval=1",
    "eval_iters=2",
    "train.threads=1",  # the same reduction order in every process: equal tensors
]
N_CHECKPOINTS, N_METRICS = 4, 17
POINTS = ["model", "optimizer", "config", "swap", "swapped", "metrics"]
FILES = {"model", "optimizer", "config", "metrics"}

# One process imports torch, then forks a child per run; a child's exit code (or -signal)
# is printed as JSON. A fork before any torch op is safe (no thread pool exists yet).
WORKER = r"""
import json, os, sys
from polygpt.backends import get_backend
get_backend("torch", "cpu")  # torch imported once, before the forks
import torch._dynamo  # noqa: F401 - torch.optim.AdamW imports it on first use: seconds
from polygpt.cli import main
runs, argv = json.loads(sys.argv[1]), json.loads(sys.argv[2])
codes = []
for out, kill in runs:
    pid = os.fork()
    if pid == 0:
        if kill:
            os.environ["POLYGPT_KILL_AT"] = kill
        code = 0
        try:
            main([*argv, "--out", out, "--quiet"], prog_name="polygpt")
        except SystemExit as e:
            code = e.code or 0
        except BaseException:
            code = 3
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


def trials() -> list[str]:
    """13 seeded kill points across the checkpoint writes and the metrics file."""
    rng = random.Random(14)
    out = ["model:2:1.0"]  # after the model file, before the optimizer file
    for i in range(12):
        point = POINTS[i % len(POINTS)]
        n = rng.randint(1, N_METRICS if point == "metrics" else N_CHECKPOINTS)
        frac = f":{rng.uniform(0.02, 0.98):.3f}" if point in FILES else ""
        out.append(f"{point}:{n}{frac}")
    return out


def _argv(char_data) -> list[str]:
    return [
        "train",
        str(ROOT / "configs" / "shakespeare_char.toml"),
        *RUN,
        f"data.dir={str(char_data)!r}",
        "--backend",
        "torch",
        "--device",
        "cpu",
    ]


def _tensors(path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _steps(path) -> tuple[str, str]:
    """The step a checkpoint file was saved at (model) and AdamW's step count (optimizer)."""
    with safe_open(str(path / checkpoints.MODEL_FILE), "numpy") as m:
        model_step = m.metadata()["step"]
    with safe_open(str(path / checkpoints.OPTIMIZER_FILE), "numpy") as o:
        opt_step = o.metadata()["step"]
    return model_step, opt_step


def _log(rows: list[dict]) -> list[tuple]:
    """The training log's steps and losses (a resumed run adds its own "start" record)."""
    return [
        (r["event"], r["step"], r.get("loss", r.get("val_loss")))
        for r in rows
        if r.get("event") in ("train", "eval")
    ]


def _loads_everywhere(out) -> int:
    """The checkpoint (model and optimizer) loads in every backend here; returns its step."""
    ck = checkpoints.read(out)
    assert _steps(ck.path) == (str(ck.step), str(ck.step)), "model and optimizer disagree"
    for name in available_backends():
        be = get_backend(name, "cpu")
        model = be.load_model(ck.model)
        assert be.load_optimizer(be.make_optimizer(model, TrainConfig()), ck.optimizer_file) == (
            ck.step
        )
    return ck.step


@requires("torch")
def test_kill_9_anywhere_then_resume_matches_an_unbroken_run(tmp_path, char_data):
    plan = trials()
    assert len(plan) >= 10 and {p.split(":")[0] for p in plan} == set(POINTS)
    runs = [(str(tmp_path / "ref" / "ck"), None)]
    runs += [(str(tmp_path / f"t{i}" / "ck"), kill) for i, kill in enumerate(plan)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = _argv(char_data)
    r = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(runs), json.dumps(argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads(r.stdout.strip().splitlines()[-1])
    assert codes[0] == 0, r.stderr[-3000:]
    assert codes[1:] == [-9] * len(plan), list(zip(plan, codes[1:]))

    ref = tmp_path / "ref" / "ck"
    ref_model, ref_opt = (
        _tensors(ref / checkpoints.MODEL_FILE),
        _tensors(ref / checkpoints.OPTIMIZER_FILE),
    )
    ref_metrics = metrics_log.read(ref)
    resumed_from, leftovers = {}, set()
    for i, kill in enumerate(plan):
        out = tmp_path / f"t{i}" / "ck"
        point, n = kill.split(":")[:2]
        has_checkpoint = (out / checkpoints.CONFIG_FILE).exists() or (
            out.parent / ".ck.old" / checkpoints.CONFIG_FILE
        ).exists()
        if point not in ("metrics",) and int(n) > 1:
            assert has_checkpoint, f"{kill}: the previous checkpoint is gone"
        leftovers.update(p.name.split("-")[0] for p in out.parent.iterdir() if p.name != "ck")
        if has_checkpoint:
            step = _loads_everywhere(out)
            resumed_from[kill] = step
            args = ["train", "--resume", "--out", str(out), "--quiet"]
        else:  # killed before the first checkpoint: start again, no --overwrite needed
            args = [*argv, "--out", str(out), "--quiet"]
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, f"{kill}: {res.output}"
        left = sorted(p.name for p in out.parent.iterdir())
        assert left == ["ck"], f"{kill}: left behind {left}"
        assert _steps(out) == ("12", "12")
        model, opt = (
            _tensors(out / checkpoints.MODEL_FILE),
            _tensors(out / checkpoints.OPTIMIZER_FILE),
        )
        for k, v in ref_model.items():
            assert np.array_equal(model[k], v), f"{kill}: {k} differs from the unbroken run"
        for k, v in ref_opt.items():
            assert np.array_equal(opt[k], v), f"{kill}: optimizer {k} differs"
        # the log is the unbroken run's: no duplicate steps, no torn line
        assert _log(metrics_log.read(out)) == _log(ref_metrics), kill
    # the seeded plan resumed from checkpoints of several different steps
    assert len(set(resumed_from.values())) >= 3, resumed_from
    # the kills did leave a temporary, an old directory and a lock file, all cleaned above
    assert leftovers == {".ck.tmp", ".ck.old", ".ck.lock"}, leftovers
