"""Perplexity: the window plan scores every target once, the batched sliding-window result equals
a brute-force per-token computation, the methods agree where they must, torch and MLX agree, and
the `polygpt eval` command formats, saves and rejects what it should."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from polygpt import checkpoints, data, evaluate, inference
from polygpt.cli import main
from polygpt.errors import PolygptError


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _context(j: int, n_tokens: int, block: int, stride: int) -> int:
    """How many tokens of left context target j (1..N-1) gets, from the definition: the first
    window scores targets 1..L with all they have; window k>0 ends at min(L + k*stride, N-1)
    and has length L; target j belongs to the first window ending at or after it."""
    L = min(block, n_tokens - 1)
    if j <= L:
        return j
    end = min(L + math.ceil((j - L) / stride) * stride, n_tokens - 1)
    return j - (end - L)


def _brute_force(be, model, tokens: np.ndarray, contexts: list[int]) -> np.ndarray:
    """NLL of each target j=1..N-1 from its own forward over exactly contexts[j-1] tokens."""
    out = []
    for j, c in enumerate(contexts, start=1):
        x = np.asarray(tokens[j - c : j], dtype=np.int32)[None]
        out.append(-_log_softmax(be.logits(model, x)[0, -1])[tokens[j]])
    return np.array(out)


@pytest.fixture(scope="module")
def lm(tiny_ckpt):
    return inference.load(tiny_ckpt, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def val(tiny_ckpt) -> np.ndarray:
    ckpt = checkpoints.read(tiny_ckpt)
    return np.array(data.load_split(ckpt.config["run"]["data"]["dir"], "val"))


# -- the plan: every target exactly once ---------------------------------------------------------
@pytest.mark.parametrize("block", [1, 4, 32])
def test_plan_scores_every_target_exactly_once(block):
    for n in sorted({2, 3, block, block + 1, block + 2, 2 * block + 1, 97, 100, 1000} - {1}):
        for stride in sorted({1, 2, 3, block // 2, block - 1, block} & set(range(1, block + 1))):
            plan = evaluate.plan_windows(n, block, stride)
            assert plan.length == min(block, n - 1)
            L = plan.length
            targets = np.concatenate(
                [np.arange(s + L - k + 1, s + L + 1) for s, k in zip(plan.starts, plan.n_scored)]
            )
            np.testing.assert_array_equal(targets, np.arange(1, n), err_msg=f"{n=} {stride=}")
            assert plan.n_targets == n - 1
            # the first window starts at 0 and scores all its positions
            assert plan.starts[0] == 0 and plan.n_scored[0] == L
            # every window lies inside the data (inputs and targets) and scores 1..stride
            assert (plan.starts >= 0).all() and (plan.starts + L <= n - 1).all()
            assert (plan.n_scored[1:] >= 1).all() and (plan.n_scored[1:] <= stride).all()
            # the tail window ends exactly at the last target
            assert plan.starts[-1] + L == n - 1
            # all but the tail score exactly `stride` (the tail may score fewer)
            assert (plan.n_scored[1:-1] == stride).all()
            expect_windows = 1 + math.ceil((n - 1 - L) / stride)
            assert plan.n_windows == expect_windows


def test_plan_rejects_bad_arguments():
    for n, block, stride in [(1, 8, 4), (100, 8, 0), (100, 8, 9), (100, 8, -1)]:
        with pytest.raises(PolygptError):
            evaluate.plan_windows(n, block, stride)


# -- exactness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_tokens", [150, 33, 20])
def test_sliding_equals_brute_force(lm, val, n_tokens):
    """Batched windows == one forward per target over exactly its context, for several strides
    (lengths not a multiple of the stride, a split shorter than the block, batch sizes that
    leave a partial last batch)."""
    tokens = val[1000 : 1000 + n_tokens]
    block = lm.spec.block_size
    assert block == 32
    cache: dict[tuple[int, int], float] = {}
    for stride in [1, 5, 16, 32]:
        contexts = [_context(j, n_tokens, block, stride) for j in range(1, n_tokens)]
        for j, c in enumerate(contexts, 1):  # one forward per (target, context), shared
            if (j, c) not in cache:
                x = np.asarray(tokens[j - c : j], dtype=np.int32)[None]
                cache[(j, c)] = -_log_softmax(lm.backend.logits(lm.model, x)[0, -1])[tokens[j]]
        brute = np.array([cache[(j, c)] for j, c in enumerate(contexts, 1)])
        res = evaluate.perplexity(
            lm.backend, lm.model, tokens, block, stride=stride, batch_size=3, keep_per_token=True
        )
        assert res.tokens == n_tokens - 1
        diff = np.abs(res.per_token_nll - brute)
        assert diff.max() < 1e-5, f"stride {stride}: max {diff.max():.2e} mean {diff.mean():.2e}"
        rel = abs(res.nll - brute.mean()) / brute.mean()
        assert rel <= 1e-5, f"stride {stride}: mean NLL rel diff {rel:.2e}"
        assert res.perplexity == pytest.approx(math.exp(brute.mean()), rel=1e-5)


def test_last_token_is_full_context_per_token(lm, val):
    """last-token == brute force with min(j, block) context == sliding at stride 1."""
    tokens = val[:90]
    block = lm.spec.block_size
    brute = _brute_force(lm.backend, lm.model, tokens, [min(j, block) for j in range(1, 90)])
    lt = evaluate.perplexity(
        lm.backend, lm.model, tokens, block, method="last-token", batch_size=7, keep_per_token=True
    )
    s1 = evaluate.perplexity(lm.backend, lm.model, tokens, block, stride=1, keep_per_token=True)
    assert lt.stride == 1 and lt.n_windows == 1 + (89 - block)
    np.testing.assert_allclose(lt.per_token_nll, brute, rtol=0, atol=1e-5)
    np.testing.assert_allclose(lt.per_token_nll, s1.per_token_nll, rtol=0, atol=1e-6)


def test_methods_agree_where_they_should(lm, val):
    """Sliding at any stride equals last-token on the targets with the same context: the first
    window's, and the last position of every window (full block of context). With a split no
    longer than the block, all strides give the same answer."""
    tokens = val[5000:5400]
    block = lm.spec.block_size
    lt = evaluate.perplexity(
        lm.backend, lm.model, tokens, block, method="last-token", keep_per_token=True
    )
    for stride in [4, 16, 32]:
        res = evaluate.perplexity(
            lm.backend, lm.model, tokens, block, stride=stride, keep_per_token=True
        )
        plan = evaluate.plan_windows(len(tokens), block, stride)
        full = np.concatenate([np.arange(1, block + 1), plan.starts[1:] + block])  # targets
        np.testing.assert_allclose(
            res.per_token_nll[full - 1], lt.per_token_nll[full - 1], rtol=0, atol=1e-5
        )
        # elsewhere less context: close on average, not equal token by token
        assert abs(res.nll - lt.nll) < 0.05 * lt.nll
    short = tokens[: block + 1]
    vals = {
        evaluate.perplexity(lm.backend, lm.model, short, block, stride=s).nll for s in [1, 7, 32]
    }
    assert max(vals) - min(vals) < 1e-6


def test_result_statistics(lm, val):
    tokens = val[:500]
    res = evaluate.perplexity(
        lm.backend, lm.model, tokens, lm.spec.block_size, char_level=True, keep_per_token=True
    )
    nll = res.per_token_nll
    assert res.stride == lm.spec.block_size // 2  # the default
    assert res.tokens == 499 and len(nll) == 499 and np.isfinite(nll).all()
    assert res.nll == pytest.approx(nll.mean())
    assert res.nll_se == pytest.approx(nll.std(ddof=1) / math.sqrt(499))
    assert res.ppl_low < res.perplexity < res.ppl_high
    assert res.ppl_low == pytest.approx(math.exp(res.nll - 1.96 * res.nll_se))
    assert res.bits_per_char == pytest.approx(res.nll / math.log(2)) == res.bits_per_token
    assert res.tokens_per_s > 0 and res.wall_s > 0
    # a 65-symbol model that trained a little beats the uniform distribution
    assert 1 < res.perplexity < 65


# -- torch and MLX --------------------------------------------------------------------------------
def _mlx_backend():
    from polygpt.backends import available_backends, get_backend

    if "mlx" not in available_backends():
        pytest.skip("mlx is not installed")
    try:
        be = get_backend("mlx", "cpu")
    except (PolygptError, ImportError, AttributeError) as e:  # being written concurrently
        pytest.skip(f"the MLX backend is not available yet: {e!r}")
    if not callable(getattr(be, "target_logprobs", None)):
        pytest.skip("the MLX backend has no target_logprobs yet")
    return be


def test_torch_and_mlx_agree(tiny_ckpt, val):
    be = _mlx_backend()
    ckpt = checkpoints.read(tiny_ckpt)
    mlx_model = be.load_model(ckpt.model, "fp32")
    lm_t = inference.load(tiny_ckpt, backend="torch", device="cpu")
    tokens = val[:3000]
    block = ckpt.spec.block_size
    for stride in [block // 2, block]:
        t = evaluate.perplexity(
            lm_t.backend, lm_t.model, tokens, block, stride=stride, keep_per_token=True
        )
        m = evaluate.perplexity(be, mlx_model, tokens, block, stride=stride, keep_per_token=True)
        d = np.abs(t.per_token_nll - m.per_token_nll)
        assert abs(t.perplexity - m.perplexity) < 1e-3, (
            f"torch {t.perplexity:.6f} vs mlx {m.perplexity:.6f}; per-token NLL max diff "
            f"{d.max():.2e}, mean {d.mean():.2e}"
        )
        assert d.max() < 1e-4, f"per-token NLL max diff {d.max():.2e}, mean {d.mean():.2e}"


# -- the command ----------------------------------------------------------------------------------
def test_cli_text_json_and_save(tiny_ckpt):
    runner = CliRunner()
    r = runner.invoke(
        main,
        [
            "eval",
            str(tiny_ckpt),
            "-b",
            "torch",
            "-d",
            "cpu",
            "--max-tokens",
            "1001",
            "--stride",
            "8",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.stdout and "1,000 tokens of the val split" in r.stdout
    assert "bits/char" in r.stdout and "stride 8" in r.stdout

    r = runner.invoke(
        main,
        [
            "eval",
            str(tiny_ckpt),
            "-b",
            "torch",
            "-d",
            "cpu",
            "--json",
            "--max-tokens",
            "1001",
            "--stride",
            "8",
            "--save",
        ],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["tokens"] == 1000 and d["stride"] == 8 and d["split"] == "val"
    assert d["method"] == "sliding" and d["backend"] == "torch" and d["precision"] == "fp32"
    assert d["perplexity"] == pytest.approx(math.exp(d["nll"]))
    assert d["ppl_low"] < d["perplexity"] < d["ppl_high"]
    # the text and JSON runs computed the same thing
    assert (
        f"{d['perplexity']:.4f}"
        in runner.invoke(
            main,
            [
                "eval",
                str(tiny_ckpt),
                "-b",
                "torch",
                "-d",
                "cpu",
                "--max-tokens",
                "1001",
                "--stride",
                "8",
            ],
        ).stdout
    )

    # --save recorded it atomically in config.json, and `polygpt info` shows it
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["metrics"]["eval_val"]["perplexity"] == d["perplexity"]
    assert "val_loss" in cfg["metrics"]  # the training metrics are kept
    assert not list(tiny_ckpt.glob(".config.json.*"))
    r = runner.invoke(main, ["info", str(tiny_ckpt)])
    assert r.exit_code == 0, r.output
    assert f"perplexity  {d['perplexity']:.4f}" in r.stdout and "1,000 val tokens" in r.stdout


def test_cli_last_token_and_train_split(tiny_ckpt):
    runner = CliRunner()
    r = runner.invoke(
        main,
        [
            "eval",
            str(tiny_ckpt),
            "-b",
            "torch",
            "-d",
            "cpu",
            "--json",
            "--method",
            "last-token",
            "--split",
            "train",
            "--max-tokens",
            "200",
            "--batch-size",
            "16",
        ],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["method"] == "last-token" and d["stride"] == 1 and d["split"] == "train"
    assert d["tokens"] == 199 and d["n_windows"] == 1 + 199 - 32 and d["batch_size"] == 16


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stride", "0"], "stride"),
        (["--stride", "33"], "block_size=32"),  # the tiny model's block is 32
        (["--method", "last-token", "--stride", "4"], "last-token"),
        (["--max-tokens", "1"], "--max-tokens"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_cli_errors(tiny_ckpt, args, message):
    r = CliRunner().invoke(main, ["eval", str(tiny_ckpt), "-b", "torch", "-d", "cpu", *args])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("error:") and message in r.output
    assert "Traceback" not in r.output


def test_cli_unknown_split_and_missing_checkpoint(tiny_ckpt, tmp_path):
    r = CliRunner().invoke(main, ["eval", str(tiny_ckpt), "--split", "test"])
    assert r.exit_code == 2 and "test" in r.output  # click's usage error names the choice
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "does not exist" in r.output
    with pytest.raises(PolygptError, match="unknown split"):
        evaluate.evaluate_checkpoint(tiny_ckpt, backend="torch", device="cpu", split="test")
