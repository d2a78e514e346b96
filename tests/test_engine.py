"""The generation engine's scheduling: on a fake backend whose logits depend on each row's
whole cached history (so a row that reads another row's cache, or a cache row left stale by a
move, changes the text), and on the tiny checkpoint in each backend."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from polygpt import inference
from polygpt.backends.slots import SlotCache, SlotOps
from polygpt.engine import Engine, Finished, InvalidRequest, Request, TextChunk
from polygpt.errors import PolygptError
from polygpt.generate import GenerationConfig
from polygpt.spec import ModelSpec

from .conftest import backends_under_test

V = 17


class Hashing(SlotOps):
    """A fake backend: the cache holds each row's tokens; the next-token logits favour
    hash(tokens) % V. Counts every call."""

    name, device = "fake", "cpu"

    def __init__(self, block: int = 64):
        self.spec = ModelSpec(vocab_size=V, block_size=block)
        self.calls: Counter[str] = Counter()
        self.prefill_tokens = 0

    def _new_slot_cache(self, model, max_rows):
        cache = SlotCache(model, self.spec, max_rows, [], [])
        cache.rows = [[] for _ in range(max_rows)]
        return cache

    @staticmethod
    def _logits(seqs) -> np.ndarray:
        out = np.zeros((len(seqs), V), dtype=np.float32)
        for i, s in enumerate(seqs):
            out[i, hash(tuple(s)) % V] = 5.0
            out[i, (hash(tuple(s)) // V) % V] += 2.0
        return out

    def _prefill(self, cache, plan):
        self.calls["prefill"] += 1
        self.prefill_tokens += int(plan.lengths.sum())
        for r, s, n in zip(plan.rows, plan.starts, plan.lengths):
            cache.rows[r] = cache.rows[r][:s] + plan.tokens[list(plan.rows).index(r), :n].tolist()
        return self._logits([cache.rows[r] for r in plan.rows])

    def _decode(self, cache, plan):
        self.calls["decode"] += 1
        for r, t, p in zip(plan.rows, plan.tokens, plan.positions):
            assert len(cache.rows[r]) >= p  # the cache holds the row's columns
            cache.rows[r] = cache.rows[r][:p] + [int(t)]
        return self._logits([cache.rows[r] for r in plan.rows])

    def _copy(self, cache, src, dst, width):
        self.calls["copy"] += 1
        for s, d in zip(src, dst):
            cache.rows[d] = list(cache.rows[s])


def _alone(prompt, stream, block=64, **kw):
    be = Hashing(block)
    e = Engine(be, None, block, 1)
    e.submit(Request(prompt=prompt, seed_stream=stream, **kw))
    out = []
    while not out:
        out = [ev for ev in e.step() if isinstance(ev, Finished)]
    return out[0].tokens


def test_one_decode_call_per_step_no_re_prefill_and_one_by_one_texts():
    """Requests arrive while others run, finish at different steps and leave (the batch is
    compacted); at most one decode call per step; every prompt is prefilled once, whole (its
    first token comes from the prefill's logits); texts equal one-by-one generation."""
    be = Hashing()
    e = Engine(be, None, 64, max_rows=4)
    rng = np.random.default_rng(0)
    reqs = [
        Request(
            prompt=rng.integers(0, V, 1 + i % 5).tolist(),
            max_tokens=5 + 3 * i,
            temperature=0.0 if i % 3 == 0 else 1.0,
            seed=i,
            seed_stream=i,
        )
        for i in range(10)
    ]
    arrivals = {0: reqs[:3], 2: reqs[3:6], 3: reqs[6:7], 9: reqs[7:]}
    done: dict[int, list[int]] = {}
    steps = 0
    while len(done) < len(reqs):
        for r in arrivals.get(steps, []):
            e.submit(r)
        before = be.calls["decode"]
        for ev in e.step():
            if isinstance(ev, Finished):
                done[reqs.index(ev.request)] = ev.tokens
        assert be.calls["decode"] - before <= 1
        assert len(e.active) <= 4
        steps += 1
    assert be.calls["copy"] >= 1  # rows left from the middle of the batch
    assert be.prefill_tokens == sum(len(r.prompt) for r in reqs)
    for i, r in enumerate(reqs):
        want = _alone(r.prompt, i, max_tokens=r.max_tokens, temperature=r.temperature, seed=i)
        assert done[i] == want and len(want) == r.max_tokens, i


def test_choices_of_one_prompt_share_one_prefill():
    be = Hashing()
    e = Engine(be, None, 64, max_rows=8)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    reqs = [Request(prompt=prompt, max_tokens=6, seed=1, seed_stream=k) for k in range(4)]
    e.submit_many(reqs)
    out = {}
    while len(out) < 4:
        out.update(
            {ev.request.seed_stream: ev.tokens for ev in e.step() if isinstance(ev, Finished)}
        )
    assert be.prefill_tokens == len(prompt) and be.calls["prefill"] == 1
    assert [out[k] for k in range(4)] == [_alone(prompt, k, max_tokens=6, seed=1) for k in range(4)]
    assert len({tuple(v) for v in out.values()}) > 1  # four streams, different samples


def test_a_slide_re_prefills_that_row_alone():
    """Block 16, keep 8: the long row slides (re-prefilling its 7 tokens before the pending one),
    the short one does not, and both texts equal their one-by-one runs. (Prefilled: the two
    prompts, 14 + 1 tokens, then the slide's 7.)"""
    be = Hashing(16)
    e = Engine(be, None, 16, max_rows=2, keep=8)
    a = Request(prompt=[1] * 14, max_tokens=10, seed=3, seed_stream=0)
    b = Request(prompt=[2], max_tokens=10, seed=3, seed_stream=1)
    e.submit_many([a, b])
    out = {}
    while len(out) < 2:
        out.update(
            {ev.request.seed_stream: ev.tokens for ev in e.step() if isinstance(ev, Finished)}
        )
    assert e.counts["slides"] == 1 and be.prefill_tokens == 14 + 1 + 7
    for k, req in enumerate((a, b)):
        be1 = Hashing(16)
        e1 = Engine(be1, None, 16, max_rows=1, keep=8)
        e1.submit(Request(prompt=req.prompt, max_tokens=10, seed=3, seed_stream=k))
        got = []
        while not got:
            got = [ev.tokens for ev in e1.step() if isinstance(ev, Finished)]
        assert out[k] == got[0], k


def test_a_first_token_waits_for_no_decode_and_arrivals_never_starve_decoding():
    """A request arriving before every step: its first token comes out in the step's first
    part (its prefill's), before that step's decode call; every step decodes all the rows that
    were running, however many requests arrive."""
    be = Hashing()
    e = Engine(be, None, 64, max_rows=32, decode_text=lambda ids: "x" * len(ids))
    reqs = [Request(prompt=[1 + i % 5, 2], max_tokens=40, stream_text=True) for i in range(20)]
    arrivals = iter(reqs)

    def feed():
        req = next(arrivals, None)
        if req is not None:
            e.submit(req)
        return req is not None

    parts = e.steps(feed)
    for i, req in enumerate(reqs):
        decodes = be.calls["decode"]
        admitted = next(parts)
        assert [ev.request for ev in admitted if isinstance(ev, TextChunk)] == [req]
        assert be.calls["decode"] == decodes  # out before any decode
        decoded = next(parts)
        assert be.calls["decode"] == decodes + (i > 0)
        assert [ev.request for ev in decoded] == reqs[:i]  # every running row took a token
    assert [r.new for r in e.active] == list(range(20, 0, -1))  # rows in arrival order
    assert e.batch_sizes == {i: 1 for i in range(1, 20)}


def test_cancel_queue_bound_and_errors():
    be = Hashing()
    e = Engine(be, None, 64, max_rows=1, max_queue=2, decode_text=lambda ids: "x" * len(ids))
    a = Request(prompt=[1], max_tokens=1000, stream_text=True)
    b = Request(prompt=[2], max_tokens=3)
    e.submit_many([a, b])
    with pytest.raises(PolygptError, match="queue is full"):
        e.submit(Request(prompt=[3]))
    events = [ev for _ in range(5) for ev in e.step()]
    assert e.waiting == 1 and any(isinstance(ev, TextChunk) for ev in events)
    e.cancel(a)
    fin = []
    while len(fin) < 2:
        fin += [ev for ev in e.step() if isinstance(ev, Finished)]
    assert [(f.request, f.reason) for f in fin] == [(a, "cancelled"), (b, "length")]
    assert len(fin[1].tokens) == 3 and e.idle()
    with pytest.raises(PolygptError, match="empty"):
        e.submit(Request(prompt=[]))
    with pytest.raises(PolygptError, match="longer than the model's context"):
        e.submit(Request(prompt=[1] * 65))
    for bad, param in [({"top_p": 0.0}, "top_p"), ({"temperature": -1}, "temperature"),
                       ({"top_k": -2}, "top_k"), ({"max_tokens": -1}, "max_tokens")]:  # fmt: skip
        with pytest.raises(InvalidRequest, match=param) as err:
            e.submit(Request(prompt=[1], **bad))
        assert err.value.param == param
    assert e.waiting == 0 and e.idle()  # nothing bad was queued


@pytest.fixture(scope="module", params=backends_under_test())
def lm(request, tiny_ckpt):
    return inference.load(tiny_ckpt, backend=request.param, device="cpu")


def test_continuous_batching_on_a_real_model_equals_one_by_one(lm):
    """Requests join a running batch at later steps, finish and leave at different steps; each
    gets what `polygpt sample` gives it alone."""
    prompts = ["ROMEO:", "\n", "First Citizen:\nBefore we", "KING", "O, ", "JULIET:\nAh"]
    e = Engine(lm.backend, lm.model, lm.spec.block_size, 4, decode_text=lm.tokenizer.decode)
    reqs = [
        Request(
            prompt=lm.encode(prompts[i % 6]),
            max_tokens=40 + 10 * i,
            temperature=0.8,
            seed=i,
            stop=["xyz"],
        )
        for i in range(8)
    ]
    out: dict[int, str] = {}
    arrivals = {0: reqs[:3], 5: reqs[3:5], 6: reqs[5:6], 12: reqs[6:]}
    step = itertools.count()

    def feed():  # before each step: the requests arriving now
        e.submit_many(arrivals.get(next(step), []))
        return len(out) < 8

    for events in e.steps(feed):
        out.update({reqs.index(ev.request): ev.text for ev in events if isinstance(ev, Finished)})
    assert max(int(k) for k in e.stats()["batch_sizes"]) == 4
    for i in range(8):
        want = lm.generate([prompts[i % 6]], GenerationConfig(40 + 10 * i, 0.8, seed=i))[0]
        assert out[i] == want, i
