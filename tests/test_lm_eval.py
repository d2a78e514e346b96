"""lm-evaluation-harness against `polygpt serve`, offline: `--model local-completions` with the
tokenizer `convert --to hf` exports, on two tasks read from a local file
(tests/data/lm_eval): its log-likelihoods equal `polygpt eval`'s per-token numbers, and its
greedy generations equal the engine's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from polygpt import convert, inference
from polygpt.generate import GenerationConfig

from .conftest import ROOT

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")

from polygpt.bench.serving import ServerProcess  # noqa: E402

TASKS = ROOT / "tests" / "data" / "lm_eval"
DATA = "tests/data/lm_eval/shakespeare.jsonl"


def _tasks(tmp: Path) -> Path:
    """The task files with the data file's absolute path (lm-eval reads it from the cwd)."""
    for f in TASKS.glob("*.yaml"):
        (tmp / f.name).write_text(f.read_text().replace(DATA, str(ROOT / DATA)))
    return tmp


def test_lm_eval_local_completions_equals_polygpt_eval(tiny_ckpt, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from polygpt.evaluate import token_nll

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = convert.to_hf(tiny_ckpt, tmp_path / "hf")
    server = ServerProcess(tiny_ckpt, "torch", "-d", "cpu")
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": f"{server.url}/completions",
                "model": "tiny",
                "tokenizer": str(hf),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "max_length": 31,
                "num_concurrent": 1,
                "max_retries": 1,
            },
            tasks=["polygpt_shakespeare_ll", "polygpt_shakespeare_gen"],
            task_manager=TaskManager(include_path=str(_tasks(tmp_path))),
            log_samples=True,
        )
    finally:
        server.close()
    lm = inference.load(tiny_ckpt, backend="torch", device="cpu")
    scored = out["samples"]["polygpt_shakespeare_ll"]
    assert len(scored) == 4
    for s in scored:
        ctx, cont = s["doc"]["context"], s["doc"]["continuation"]
        ids = np.array(lm.encode(ctx + cont))
        block = lm.spec.block_size
        nll = token_nll(lm.backend, lm.model, ids, block, stride=block, batch_size=1)
        want = -nll[-len(lm.encode(cont)) :].sum()
        got = float(s["resps"][0][0][0])
        assert got == pytest.approx(want, abs=1e-4), (ctx, cont)
    generated = out["samples"]["polygpt_shakespeare_gen"]
    for s in generated:
        cfg = GenerationConfig(max_new_tokens=8, temperature=0.0, stop=["\n"])
        assert s["resps"][0][0] == lm.generate([s["doc"]["context"]], cfg)[0]
