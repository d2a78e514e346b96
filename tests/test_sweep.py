"""The sweep runner and plots on a tiny config: outputs exist and parse, finished runs skip."""

import json
import math

import pytest

from polygpt import checkpoints, sweep
from polygpt.errors import PolygptError

from .conftest import ROOT, TINY


def _sweep_file(tmp_path, char_data, iters=(8, 12)):
    runs = "".join(
        f"""
[[run]]
name = "r{n}"
config = "{ROOT / "configs/shakespeare_char.toml"}"
overrides = {json.dumps([*TINY, f"max_iters={n}", "eval_interval=4", f"data.dir={char_data}"])}
"""
        for n in iters
    )
    p = tmp_path / "sweep.toml"
    p.write_text(
        f'[sweep]\nname = "tiny"\nout = "{tmp_path / "runs"}"\nresults = "{tmp_path / "res"}"\n'
        f'sample_tokens = 20\ndevice = "cpu"\neval_max_tokens = 3001\n{runs}'
    )
    return p


def test_sweep_trains_evaluates_skips_and_plots(tmp_path, char_data):
    sw = sweep.load_sweep(_sweep_file(tmp_path, char_data))
    logs = []
    results = sweep.run_sweep(sw, on_event=logs.append)
    assert [r["name"] for r in results] == ["r8", "r12"]
    for r in results:
        assert r["val_ppl"] > 1 and r["eval_tokens"] == 3000  # N tokens, N - 1 targets
        assert r["val_bpc"] == pytest.approx(math.log2(r["val_ppl"]))
        assert len(r["sample"]) == 20
    table = json.loads((tmp_path / "res" / "results.json").read_text())
    assert table == results
    md = (tmp_path / "res" / "results.md").read_text()
    assert "| r8 | torch |" in md and "### r12" in md
    ck = checkpoints.read(tmp_path / "runs" / "r12")
    assert ck.step == 12 and ck.config["metrics"]["eval_val"]["perplexity"] == results[1]["val_ppl"]

    # run again: everything is skipped, nothing rewritten
    before = (tmp_path / "runs" / "r8" / "model.safetensors").stat().st_mtime_ns
    logs.clear()
    again = sweep.run_sweep(sw, on_event=logs.append)
    assert again == results and sum(isinstance(m, sweep.RunSkipped) for m in logs) == 2
    assert (tmp_path / "runs" / "r8" / "model.safetensors").stat().st_mtime_ns == before
    # running one run alone still tabulates every finished run
    sweep.run_sweep(sw, only=["r12"], on_event=logs.append)
    assert json.loads((tmp_path / "res" / "results.json").read_text()) == results

    from polygpt import plot

    runs = [tmp_path / "runs" / "r8", tmp_path / "runs" / "r12"]
    for kind in plot.KINDS:
        png = plot.plot(runs, tmp_path / f"{kind}.png", kind)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_run_resumes_and_changed_run_retrains(tmp_path, char_data):
    from polygpt.train import train

    sw = sweep.load_sweep(_sweep_file(tmp_path, char_data, iters=(12,)))
    run = sw.runs[0]
    cfg = sweep.run_config(sw, run)
    fp = sweep.fingerprint(cfg)
    cfg.train.max_iters = 4  # as if stopped after the first checkpoint
    train(cfg, extra_config={"sweep_fingerprint": fp})
    logs = []
    (res,) = sweep.run_sweep(sw, on_event=logs.append)
    assert res["resumed"] and any(isinstance(m, sweep.RunStart) and m.resumed for m in logs)
    assert checkpoints.read(tmp_path / "runs" / "r12").step == 12
    # a changed config no longer matches the fingerprint: retrained from scratch
    run.overrides.append("lr=5e-4")
    logs.clear()
    (res2,) = sweep.run_sweep(sw, on_event=logs.append)
    assert not res2["resumed"] and res2["fingerprint"] != res["fingerprint"]


def test_sweep_file_errors(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('[sweep]\nnmae = "x"\n[[run]]\nname = "a"\nconfig = "c.toml"\n')
    with pytest.raises(PolygptError, match="unknown sweep key 'nmae'"):
        sweep.load_sweep(p)
    p.write_text('[[run]]\nname = "a"\n')
    with pytest.raises(PolygptError, match="needs a name and a config"):
        sweep.load_sweep(p)
    p.write_text("[sweep]\n")
    with pytest.raises(PolygptError, match="no \\[\\[run\\]\\]"):
        sweep.load_sweep(p)
    with pytest.raises(PolygptError, match="cannot read sweep file"):
        sweep.load_sweep(tmp_path / "missing.toml")


def test_plot_errors(tmp_path):
    from polygpt import plot

    with pytest.raises(PolygptError, match="does not exist"):
        plot.plot([tmp_path / "nope"], tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolygptError, match="metrics.jsonl"):
        plot.plot([tmp_path / "empty"], tmp_path / "x.png")


@pytest.mark.parametrize(
    "sweep_file, name, fp",
    [
        ("experiments/shakespeare.toml", "0.8M-500", "2cb4aa88e3c4d20b"),
        ("experiments/shakespeare.toml", "6.3M-4000", "8ca700e63846cd43"),
        ("experiments/shakespeare.toml", "0.8M-2000-mlx", "8b23afd028186c6b"),
        ("experiments/seeds.toml", "torch-seed1", "a2c4026bb7f5d11a"),
    ],
)
def test_fingerprints_of_trained_runs_do_not_move(sweep_file, name, fp, monkeypatch):
    """Runs already trained are recognised by these hashes: a config change that does not
    change a run's numbers (a removed key, a new default elsewhere) must keep them."""
    monkeypatch.chdir(ROOT)
    sw = sweep.load_sweep(sweep_file)
    (run,) = [r for r in sw.runs if r.name == name]
    assert sweep.fingerprint(sweep.run_config(sw, run)) == fp
