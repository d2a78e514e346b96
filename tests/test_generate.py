"""The generation engine on models that really ran (the tiny checkpoint, block_size 32), in each
backend: KV-cached logits equal a full forward over the same window at every step (sliding
included), batches equal one-by-one generation, stop strings, streaming, prompt errors.
Engine bookkeeping (stop strings, streaming holds) is also checked on a mock backend whose
logits are known exactly, as nanochat's engine tests do."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from polygpt import inference, modelfile
from polygpt.backends.slots import SlotCache, SlotOps
from polygpt.cli import main
from polygpt.engine import Engine, Finished, Request, TextChunk
from polygpt.errors import PolygptError
from polygpt.generate import GenerationConfig, finish, generate, stream_generate, uncached_generate
from polygpt.spec import ModelSpec

from .conftest import backends_under_test

PROMPTS = ["ROMEO:", "\n", "First Citizen:\nBefore we proceed any further"]  # 6, 1, 44 chars


@pytest.fixture(scope="module", params=backends_under_test())
def lm(request, tiny_ckpt):
    return inference.load(tiny_ckpt, backend=request.param, device="cpu")


def prompt_ids(lm, texts=PROMPTS):
    ids = [lm.encode(t) for t in texts]
    return [p[-lm.spec.block_size :] for p in ids]  # the long one cropped to a full block


def max_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---- the KV cache against full recompute ---------------------------------------------------


def _record(steps: list):
    """An engine observer keeping each step's (row index, window, logits)."""

    def observe(rows, logits):
        steps.append([(r.req.tag, r.window(), logits[i]) for i, r in enumerate(rows)])

    return observe


def test_cached_logits_equal_full_forward_at_every_step(lm):
    """A batch of 3 prompts of different lengths, 100 tokens each: every row's window slides
    (block 32, keep 16) several times, at different steps for different rows, and every
    step's logits equal a full forward over the row's window."""
    be, model, block = lm.backend, lm.model, lm.spec.block_size
    steps: list = []
    cfg = GenerationConfig(max_new_tokens=100, temperature=1.0, seed=2)
    generate(be, model, block, prompt_ids(lm), cfg, observe=_record(steps))
    worst, slides, last_len = 0.0, 0, {}
    for step in steps:
        for b, window, logits in step:
            assert 1 <= len(window) <= block
            full = be.logits(model, window[None])[0, -1]
            worst = max(worst, max_abs_diff(logits, full))
            slides += len(window) < last_len.get(b, 0)
            last_len[b] = len(window)
    assert slides >= 9, slides  # each row slid at least 3 times
    assert worst <= 1e-5, f"cached vs full forward: max |diff| {worst:.3g}"


def test_windows_follow_the_per_row_rule(lm):
    """A row slides when its window would exceed block_size, to its last `keep` tokens."""
    block = lm.spec.block_size
    steps: list = []
    cfg = GenerationConfig(max_new_tokens=60, temperature=1.0, keep=10)
    out = generate(lm.backend, lm.model, block, [[1] * 5, [2] * block], cfg, observe=_record(steps))
    lengths = np.array([[len(w) for _, w, _ in step] for step in steps])
    assert lengths.max() == block
    # row 0: its 5 prompt tokens and n new ones until that reaches 32 (n = 27), then 10
    assert lengths[27, 0] == block and lengths[28, 0] == 10
    # row 1 starts full: it slides at its second step
    assert lengths[0, 1] == block and lengths[1, 1] == 10
    # history is exact: the window is the tail of prompt + generated tokens
    window = steps[-1][0][1]
    full = np.concatenate([[1] * 5, out[0][:-1]])
    np.testing.assert_array_equal(window, full[-len(window) :])


# ---- batching ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        GenerationConfig(max_new_tokens=80, temperature=0.0),
        GenerationConfig(max_new_tokens=80, temperature=0.9, top_k=20, top_p=0.95, seed=11),
    ],
    ids=["greedy", "seeded"],
)
def test_batched_equals_one_by_one(lm, cfg):
    """Prompts of different lengths (left-padded), past the window: row b of the batch is what
    prompt b gives alone (sampling: row b draws from stream (seed, b) either way)."""
    prompts = prompt_ids(lm)
    block = lm.spec.block_size
    batched = generate(lm.backend, lm.model, block, prompts, cfg)
    for b, p in enumerate(prompts):
        alone = generate(lm.backend, lm.model, block, [p], cfg, seed_streams=[b])[0]
        first = next((i for i, (u, v) in enumerate(zip(batched[b], alone)) if u != v), None)
        assert first is None and len(alone) == 80, f"row {b} differs from token {first}"
    if cfg.temperature > 0:  # (greedy on the 60-step model repeats spaces from any prompt)
        assert len({tuple(r) for r in batched}) == 3


def test_cached_generation_equals_nanogpt_method_before_the_window_slides(lm):
    """Until a window slides both methods condition on the same tokens: same picks."""
    block = lm.spec.block_size
    p = lm.encode("ROMEO:")
    n = block - len(p)  # the last token both see with the full prompt in context
    for cfg in (
        GenerationConfig(max_new_tokens=n, temperature=0.0),
        GenerationConfig(max_new_tokens=n, temperature=1.0, seed=4),
    ):
        ours = generate(lm.backend, lm.model, block, [p, p], cfg)
        theirs = uncached_generate(lm.backend, lm.model, block, [p, p], cfg)
        assert ours == theirs
    assert ours[0] != ours[1]  # two samples of one prompt differ (streams 0 and 1)


def test_seeded_sampling_is_deterministic(lm):
    cfg = GenerationConfig(max_new_tokens=60, temperature=1.0, seed=5)
    p = prompt_ids(lm)
    a = generate(lm.backend, lm.model, lm.spec.block_size, p, cfg)
    b = generate(lm.backend, lm.model, lm.spec.block_size, p, cfg)
    c = generate(
        lm.backend,
        lm.model,
        lm.spec.block_size,
        p,
        GenerationConfig(max_new_tokens=60, temperature=1.0, seed=6),
    )
    assert a == b and a != c


# ---- stop strings and streaming ------------------------------------------------------------


def test_stop_string_cuts_the_row_and_the_others_go_on(lm):
    cfg = GenerationConfig(max_new_tokens=70, temperature=0.0)
    texts = lm.generate(PROMPTS[:2], cfg)
    stop = texts[0][20:23]  # a string the greedy text really contains
    streamed = {0: [], 1: []}
    cfg_stop = GenerationConfig(max_new_tokens=70, temperature=0.0, stop=[stop])
    stopped = lm.generate(PROMPTS[:2], cfg_stop, on_text=lambda row, s: streamed[row].append(s))
    for b, text in enumerate(texts):
        expected = text[: text.index(stop)] if stop in text else text
        assert stopped[b] == expected
        assert "".join(streamed[b]) == expected  # the stop string itself never streams


class Counting(SlotOps):
    """A mock backend: token t is always followed by t+1 (mod V), with certainty."""

    name, device = "mock", "cpu"

    def __init__(self, vocab: int = 10, block: int = 8):
        self.V, self.spec = vocab, ModelSpec(vocab_size=vocab, block_size=block)

    def _logits(self, last):
        out = np.full((len(last), self.V), -30.0, dtype=np.float32)
        out[np.arange(len(last)), (np.asarray(last) + 1) % self.V] = 0.0
        return out

    def _new_slot_cache(self, model, max_rows):
        return SlotCache(model, self.spec, max_rows, [], [])

    def _prefill(self, cache, plan):
        return self._logits(plan.tokens[np.arange(len(plan.rows)), plan.last])

    def _decode(self, cache, plan):
        return self._logits(plan.tokens)

    def _copy(self, cache, src, dst, width):
        pass

    def logits(self, model, x):
        return np.stack([self._logits(x[:, t]) for t in range(x.shape[1])], axis=1)


DIGITS = lambda ids: "".join(str(i) for i in ids)  # noqa: E731


def _streamed(be, block, prompts, cfg):
    """Each prompt's new tokens, and the (row, text) chunks streamed on the way."""
    chunks = []

    def keep(ev):
        if isinstance(ev, TextChunk):
            chunks.append((ev.request.tag, ev.text))

    events = stream_generate(be, None, block, prompts, cfg, decode_text=DIGITS, stream_text=True)
    return [f.tokens for f in finish(events, keep)], chunks


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stop_strings_and_streaming_on_a_mock(temperature):
    be = Counting()
    cfg = GenerationConfig(max_new_tokens=30, temperature=temperature, stop=["567", "99"])
    out, chunks = _streamed(be, 8, [[1], [8]], cfg)
    # row 0 counts 2 3 4 then stops before 5 6 7; row 1 counts 9 0 1 ... and stops at 567 too
    assert out == [[2, 3, 4], [9, 0, 1, 2, 3, 4]]
    assert "".join(s for r, s in chunks if r == 0) == "234"
    # "5" and "56" were held back (they could start "567"), never streamed
    assert all("5" not in s for _, s in chunks)


def test_streaming_holds_back_only_possible_stop_prefixes():
    be = Counting()
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0, stop=["45x"])
    out, chunks = _streamed(be, 8, [[0]], cfg)
    chunks = [s for _, s in chunks]
    assert out == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]]  # "45x" never appears
    assert "".join(chunks) == "123456789012"  # everything streamed, in order
    assert "4" not in chunks  # "4" waited for the next token ("45" too), then went out


def test_a_stop_string_inside_a_token_streams_what_the_whole_completion_has():
    """BPE tokens may hold text on both sides of a stop string: "b\n" then "\nc" for the stop
    "\n\n". Streamed chunks carry the tokens whose text is entirely out, so streamed
    log-probabilities equal the whole completion's entry for entry, and the text before the
    stop string ("ab") is the same either way."""
    pieces = {1: "a", 2: "b\n", 3: "\nc", 4: "d"}
    decode = lambda ids: "".join(pieces.get(i, "?") for i in ids)  # noqa: E731
    e = Engine(Counting(), None, 8, 1, decode_text=decode)
    req = Request([0], max_tokens=6, temperature=0.0, stop=["\n\n"], stream_text=True, logprobs=1)
    e.submit(req)
    events = [ev for step in e.steps() for ev in step]
    chunks, (done,) = events[:-1], events[-1:]
    assert all(isinstance(c, TextChunk) for c in chunks) and isinstance(done, Finished)
    assert done.reason == "stop" and done.text == "".join(c.text for c in chunks) == "ab"
    assert done.tokens == [1] == [t for c in chunks for t in c.tokens]
    assert done.logprobs == [lp for c in chunks for lp in c.logprobs]
    assert done.usage == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def test_max_new_tokens_zero_and_windows_on_a_mock():
    be = Counting()
    assert generate(be, None, 8, [[1], [2, 3]], GenerationConfig(max_new_tokens=0)) == [[], []]
    be = Counting(block=4)
    out = generate(be, None, 4, [[0]], GenerationConfig(max_new_tokens=25, temperature=0.0))
    assert out == [[(1 + i) % 10 for i in range(25)]]  # sliding never loses a token


def test_cli_streams_what_it_would_print_at_once(tiny_ckpt):
    runner = CliRunner()
    args = [
        "sample",
        str(tiny_ckpt),
        "--prompt",
        "ROMEO:",
        "-n",
        "120",
        "--seed",
        "3",
        "--backend",
        "torch",
    ]
    streamed = runner.invoke(main, args)
    whole = runner.invoke(main, [*args, "--no-stream"])
    assert streamed.exit_code == 0 and whole.exit_code == 0, streamed.output + whole.output
    assert streamed.output == whole.output
    assert streamed.output.startswith("ROMEO:") and len(streamed.output) > 100
    text = whole.output[len("ROMEO:") :]
    stop = text[30:33]
    cut = runner.invoke(main, [*args, "--stop", stop])
    assert cut.exit_code == 0
    assert cut.output == "ROMEO:" + text[: text.index(stop)] + "\n"


def test_cli_num_samples_are_the_batch_rows(tiny_ckpt):
    res = CliRunner().invoke(
        main,
        [
            "sample",
            str(tiny_ckpt),
            "--prompt",
            "A",
            "-n",
            "40",
            "--num-samples",
            "3",
            "--backend",
            "torch",
        ],
    )
    assert res.exit_code == 0, res.output
    samples = [s for s in res.output.split("--- sample ")[1:]]
    assert len(samples) == 3 and len(set(samples)) == 3


# ---- errors --------------------------------------------------------------------------------


def test_empty_and_too_long_prompts_are_user_errors(lm):
    block = lm.spec.block_size
    cfg = GenerationConfig(max_new_tokens=5)
    with pytest.raises(PolygptError, match="empty"):
        generate(lm.backend, lm.model, block, [[1], []], cfg)
    with pytest.raises(PolygptError, match="longer than the model's context"):
        generate(lm.backend, lm.model, block, [[1] * (block + 1)], cfg)
    with pytest.raises(PolygptError, match="longer than the model's context"):
        uncached_generate(lm.backend, lm.model, block, [[1] * (block + 1)], cfg)
    with pytest.raises(PolygptError, match="keep"):
        generate(
            lm.backend, lm.model, block, [[1]], GenerationConfig(max_new_tokens=5, keep=block + 1)
        )


def test_cli_prompt_errors(tiny_ckpt):
    runner = CliRunner()
    empty = runner.invoke(main, ["sample", str(tiny_ckpt), "--prompt", ""])
    assert empty.exit_code == 1 and "--prompt: the prompt is empty" in empty.output
    for args, words in [(["-t", "-1"], "--temperature: temperature must be >= 0"),
                        (["--top-p", "0"], "--top-p: top_p must be in (0, 1]"),
                        (["-n", "-1"], "--max-new-tokens: max_tokens must be >= 0")]:  # fmt: skip
        bad = runner.invoke(main, ["sample", str(tiny_ckpt), *args])
        assert bad.exit_code == 1 and words in bad.output and not bad.stdout.startswith("\n")
    long = runner.invoke(main, ["sample", str(tiny_ckpt), "--prompt", "x" * 40, "-n", "5"])
    assert long.exit_code == 0 and "longer than the context" in long.stderr  # cropped


@pytest.fixture(scope="module")
def biased_model_file(tmp_path_factory):
    """A GPT-2-style spec (biases everywhere, exact GELU) with random nonzero biases."""
    pytest.importorskip("torch")
    import torch

    from polygpt.backends import get_backend
    from polygpt.spec import ModelSpec

    spec = ModelSpec(
        vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True, activation="gelu"
    )
    be = get_backend("torch", "cpu")
    model = be.init_model(spec, 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("biased") / "model.safetensors"
    be.save_model(model, path, modelfile.metadata(spec))
    return spec, path


@pytest.mark.parametrize("backend", backends_under_test())
def test_cached_logits_with_biases_and_exact_gelu(biased_model_file, backend):
    from polygpt.backends import get_backend

    spec, path = biased_model_file
    be = get_backend(backend, "cpu")
    model = be.load_model(modelfile.check(path, spec))
    steps: list = []
    cfg = GenerationConfig(max_new_tokens=30, temperature=1.0)
    generate(be, model, spec.block_size, [[1, 2, 3], [4]], cfg, observe=_record(steps))
    worst = 0.0
    for step in steps:
        for _, window, logits in step:
            full = be.logits(model, window[None])[0, -1]
            worst = max(worst, max_abs_diff(logits, full))
    assert len(steps) == 30 and worst <= 1e-5, f"cached vs full forward: max |diff| {worst:.3g}"
