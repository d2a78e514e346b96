"""polygpt bench on a tiny trained model: the result schema, the outputs, the CLI.

Rates are measured for real but never compared with a threshold (timing belongs in
benchmarks, not in pass/fail tests); what is asserted is that every measurement ran, is a
positive finite number, and lands in the JSON, CSV, Markdown and PNG outputs.
"""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest
from click.testing import CliRunner

from polygpt import checkpoints
from polygpt.bench import measure as bench_measure
from polygpt.bench import run as bench
from polygpt.cli import main
from polygpt.errors import PolygptError

from .conftest import backends_under_test

QUICK = dict(
    batch_sizes=[1, 2],
    new_tokens=4,
    prompt_tokens=3,
    repeats=1,
    warmup=0,
    budget_s=1.0,
    config_budget_s=3.0,  # past it, decode rates come from short probe runs: still measured
    train_steps=2,
    train_warmup=1,
    ppl_tokens=300,
)


def _rate_ok(v: bench_measure.Rate) -> None:
    assert v.n >= 1 and 0 < v.min <= v.median <= v.max and math.isfinite(v.max)


def test_stats_and_timed_rate():
    s = bench_measure.stats([2.0, 4.0, 3.0])
    assert (s.median, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 3)
    assert s.spread_pct == pytest.approx(200 / 3) and not s.probe
    calls = []
    r = bench_measure.timed_rate(lambda: calls.append(1), work=10, repeats=3, warmup=1, budget_s=60)
    assert len(calls) == 4 and r.n == 3  # one warm-up, three timed
    _rate_ok(r)


@pytest.mark.parametrize("backend", backends_under_test())
def test_run_config_measures_everything(tiny_ckpt, backend):
    cfg = bench_measure.BenchConfig(checkpoint=str(tiny_ckpt), **QUICK)
    row = bench_measure.measure(cfg, backend, "cpu", "fp32")
    assert row.status == "ok", row.reason
    for group in (row.prefill, row.decode_kv, row.decode_nocache):
        assert set(group) == {"b1", "b2"}
        for v in group.values():
            _rate_ok(v)
    _rate_ok(row.train)
    assert row.train.dtype == "fp32" and row.train.batch == "8x32"
    # fp32 size is the checkpoint's own model.safetensors
    ckpt = checkpoints.read(tiny_ckpt)
    assert row.size_mb == pytest.approx(ckpt.model_file.stat().st_size / 1e6)
    assert row.memory["peak_rss_mb"] > 0 and row.memory["weights_mb"] > 0
    # perplexity of a 60-step model on 300 val tokens: worse than a good model, far better
    # than uniform over the 65 characters
    assert 3 < row.ppl.perplexity < 65 and row.ppl.tokens == 299
    assert row.describe["backend"] == backend
    assert bench_measure.Row.from_dict(row.to_dict()) == row  # the worker's JSON round trip


def test_unavailable_precision_and_device_are_skipped_with_reasons(tiny_ckpt, monkeypatch):
    from polygpt.backends.torch_backend.backend import Backend

    def no_int4(self, precision):  # a machine whose torch lacks the 4-bit kernel
        if precision == "int4":
            raise PolygptError("torch int4 is not available here")

    monkeypatch.setattr(Backend, "_check_precision", no_int4)
    cfg = bench_measure.BenchConfig(checkpoint=str(tiny_ckpt), **QUICK)
    row = bench_measure.measure(cfg, "torch", "cpu", "int4")
    assert row.status == "skipped" and row.scope == "precision" and "int4" in row.reason
    row = bench_measure.measure(cfg, "torch", "nodevice", "fp32")
    assert row.status == "skipped" and row.scope == "device" and "nodevice" in row.reason


ABSENT = "mps" if sys.platform.startswith("linux") else "cuda"  # a device torch never has here


def test_cli_writes_every_output(tiny_ckpt, tmp_path):
    out = tmp_path / "bench"
    args = [
        "bench",
        str(tiny_ckpt),
        "--backends",
        "torch",
        "--devices",
        f"cpu,{ABSENT}",
        "--precisions",
        "fp32",
        "--batch-sizes",
        "1,2",
        "--new-tokens",
        "4",
        "--repeats",
        "1",
        "--ppl-tokens",
        "300",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "| torch | cpu | fp32 |" in res.output and f"torch/{ABSENT}/fp32: skipped" in res.output

    result = json.loads((out / "results.json").read_text())
    assert set(result) >= {"checkpoint", "environment", "settings", "results", "wall_s"}
    env = result["environment"]
    assert env["cpu"] and env["python"] and env["versions"]["torch"] and env["logical_cpus"] >= 1
    rows = {r["device"]: r for r in result["results"]}
    assert rows["cpu"]["status"] == "ok" and rows[ABSENT]["status"] == "skipped"
    assert rows["cpu"]["describe"]["framework"].startswith("torch")
    assert result["settings"]["batch_sizes"] == [1, 2]

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["device"] for r in table] == ["cpu", ABSENT]
    fp32 = table[0]
    for col in (
        "decode_kv_b1_median",
        "decode_nocache_b2_median",
        "prefill_b2_median",
        "train_tokens_per_s",
        "ppl",
        "size_mb",
        "peak_rss_mb",
    ):
        assert float(fp32[col]) > 0, col
    assert table[1]["status"] == "skipped" and table[1]["reason"]

    md = (out / "results.md").read_text()
    assert "| backend | device | precision |" in md and "KV decode b2" in md
    for png in ("tokens_per_s.png", "ppl_vs_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "logs" / "torch-cpu-fp32.log").exists()


def test_cli_rejects_bad_lists(tiny_ckpt, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        main, ["bench", str(tiny_ckpt), "--precisions", "fp64", "--out", str(tmp_path)]
    )
    assert res.exit_code == 1 and "unknown precision 'fp64'" in res.output
    res = runner.invoke(
        main, ["bench", str(tiny_ckpt), "--batch-sizes", "1,x", "--out", str(tmp_path)]
    )
    assert res.exit_code == 1 and "--batch-sizes takes a comma-separated list" in res.output


@pytest.mark.parametrize(
    "load, cpus, threads",
    [(0.4, 2, 0), (1.3, 2, 1), (6.5, 2, 1), (3.2, 8, 5)],
)
def test_auto_threads_leaves_the_busy_cores_alone(monkeypatch, load, cpus, threads):
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(bench.os, "cpu_count", lambda: cpus)
    n, note = bench.auto_threads()
    assert n == threads and f"load {load:.2f} on {cpus} CPUs" in note
