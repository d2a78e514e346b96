"""`polygpt serve` end to end, in each backend: the real command on a free localhost port with the
tiny checkpoint, driven by the official `openai` client (and raw HTTP for malformed requests).
Texts equal `polygpt sample` / the engine's one-by-one results; 16 concurrent streams come back
right and are decoded as one batch; bad requests get OpenAI-style 4xx errors and the server
keeps serving; a client that goes away frees its slot; log-probabilities (the prompt's equal
`polygpt eval`'s), chat completions, and a 429 beyond the queue. The engine's scheduling
itself is tested step by step in test_engine.py."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner

from polygpt import inference
from polygpt.cli import main
from polygpt.generate import GenerationConfig

from .conftest import backends_under_test

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from polygpt.bench.serving import ServerProcess, format_row, run_clients, summarize  # noqa: E402

PROMPTS = ["ROMEO:", "\n", "First Citizen:\nBefore we", "KING", "O, ", "JULIET:\nAh"]


def start(ckpt, backend: str, *args: str) -> ServerProcess:
    """`polygpt serve` on a free port, with the official client pointed at it."""
    s = ServerProcess(ckpt, backend, "-d", "cpu", *args)
    s.client = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0)
    return s


@pytest.fixture(scope="module", params=backends_under_test())
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def server(tiny_ckpt, backend):
    s = start(tiny_ckpt, backend, "--max-batch", "16", "--max-tokens-limit", "4000")
    yield s
    s.close()


@pytest.fixture(scope="module")
def lm(tiny_ckpt, backend):
    return inference.load(tiny_ckpt, backend=backend, device="cpu")


def one_by_one(lm, prompt: str, n: int = 1, **kw) -> list[str]:
    """What `polygpt sample --num-samples n` generates (the engine, no server)."""
    return lm.generate([prompt] * n, GenerationConfig(**kw))


# ---- the OpenAI API through the official client ------------------------------------------


def test_greedy_completion_equals_polygpt_sample(server, tiny_ckpt, backend):
    res = server.client.completions.create(
        model="tiny", prompt="ROMEO:", max_tokens=60, temperature=0
    )
    args = ["sample", str(tiny_ckpt), "-b", backend, "-d", "cpu", "-t", "0", "-n", "60"]
    out = CliRunner().invoke(main, [*args, "--prompt", "ROMEO:"])
    assert out.exit_code == 0, out.output
    assert "ROMEO:" + res.choices[0].text + "\n" == out.output
    assert res.choices[0].finish_reason == "length" and res.object == "text_completion"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (6, 60)
    assert res.usage.total_tokens == 66
    assert [m.id for m in server.client.models.list().data] == [tiny_ckpt.name]
    assert any(res.id in line and "ttft" in line for line in server.lines)  # the request log


def test_seeded_n_top_k_and_stop(server, lm):
    kw = dict(max_new_tokens=80, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    want = one_by_one(lm, "JULIET:", 3, stop=["e"], **kw)
    res = server.client.completions.create(
        model="tiny",
        prompt="JULIET:",
        max_tokens=80,
        temperature=0.9,
        top_p=0.95,
        seed=7,
        n=3,
        stop="e",
        extra_body={"top_k": 20},
    )
    assert [c.text for c in sorted(res.choices, key=lambda c: c.index)] == want
    for c in res.choices:
        assert "e" not in c.text
        assert c.finish_reason == ("stop" if len(want[c.index]) < 80 else "length")
    assert any(c.finish_reason == "stop" for c in res.choices)
    # a list of prompts: choice k is prompt k // n, sample k % n, stream k (as sample's batch)
    res = server.client.completions.create(
        model="tiny", prompt=["KING", "O, "], max_tokens=30, temperature=1.0, seed=3, n=2
    )
    batch = lm.generate(["KING", "KING", "O, ", "O, "], GenerationConfig(30, 1.0, seed=3))
    assert [c.text for c in sorted(res.choices, key=lambda c: c.index)] == batch
    assert res.usage.prompt_tokens == 4 + 3 and res.usage.completion_tokens == 4 * 30


def test_streaming_equals_the_whole_completion(server, lm):
    kw = dict(model="tiny", prompt="ROMEO:", max_tokens=50, temperature=0.8, seed=5, n=2)
    stream = server.client.completions.create(
        **kw, stop=["\n\n", "the"], stream=True, stream_options={"include_usage": True}
    )
    texts, finish, usage = ["", ""], [None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    want = one_by_one(lm, "ROMEO:", 2, max_new_tokens=50, temperature=0.8, seed=5)
    want = [t[: min([t.find(s) for s in ("\n\n", "the") if s in t] or [len(t)])] for t in want]
    assert texts == want and None not in finish
    assert usage is not None and usage.prompt_tokens == 6
    assert usage.completion_tokens == sum(len(lm.encode(t)) for t in texts)
    echo = server.client.completions.create(model="tiny", prompt="AB", max_tokens=3, echo=True)
    assert echo.choices[0].text.startswith("AB") and len(echo.choices[0].text) == 5


def test_16_concurrent_streams_are_batched_and_equal_one_by_one(server, lm):
    """120 tokens past a 32-token block: every row's window slides, each at its own steps,
    and no row's text changes for it; the engine process sends one message per step."""
    first = server.stats()
    before = first["batch_sizes"]
    jobs = [(PROMPTS[i % len(PROMPTS)], 100 + i) for i in range(16)]

    def run(job):
        prompt, seed = job
        stream = server.client.completions.create(
            model="tiny", prompt=prompt, max_tokens=120, temperature=0.8, seed=seed, stream=True
        )
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, jobs))
    for (prompt, seed), text in zip(jobs, got):
        want = one_by_one(lm, prompt, max_new_tokens=120, temperature=0.8, seed=seed)[0]
        assert text == want, (prompt, seed)
    stats = server.stats()
    after = stats["batch_sizes"]
    ran = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert max(ran) > 1, f"no step decoded more than one request: {ran}"
    # the engine process sends one message per step, whatever the rows (not one per token)
    steps = stats["decode_steps"] - first["decode_steps"]
    assert stats["messages"] - first.get("messages", 0) <= steps + len(jobs)


# ---- errors, disconnects, /health during generation --------------------------------------

BAD = [
    ("{not json", "the request body is not valid JSON", None),
    ('{"model": "x", "prompt": "hi", "max_tokens": "many"}', "integer", "max_tokens"),
    ('{"model": "x", "prompt": "hi", "temperature": [1]}', "number", "temperature"),
    ('{"model": "x", "prompt": "hi", "frobnicate": 1}', "not permitted", "frobnicate"),
    ('{"model": "x"}', "required", "prompt"),
    ('{"model": "x", "prompt": "caf\\u00e9 \\u2603"}', "not in the model's vocabulary", "prompt"),
    ('{"model": "x", "prompt": "hi", "max_tokens": 4001}', "limit of 4000", "max_tokens"),
    ('{"model": "x", "prompt": "' + "a" * 33 + '"}', "longer than the model's context", "prompt"),
    ('{"model": "x", "prompt": ""}', "empty", "prompt"),
    ('{"model": "x", "prompt": "hi", "n": 17}', "at most 16", "n"),
    ('{"model": "x", "prompt": "hi", "top_p": 0}', "top_p must be in (0, 1]", "top_p"),
    ('{"model": "x", "prompt": "hi", "temperature": -1}', "must be >= 0", "temperature"),
    ('{"model": "x", "prompt": "hi", "max_tokens": -1}', "max_tokens must be >= 0", "max_tokens"),
    ('{"model": "x", "prompt": [65]}', "token id 65 is outside the vocabulary (0..64)", "prompt"),
    ('{"model": "x", "prompt": [[3], [-1]]}', "token id -1 is outside", "prompt"),
    ('{"model": "x", "prompt": [3, 1.5]}', "token ids must be integers, got 1.5", "prompt"),
    ('{"model": "x", "prompt": [3, true]}', "token ids must be integers, got true", "prompt"),
    ('{"model": "x", "prompt": [3, [4]]}', "not a mix", "prompt"),
    ('{"model": "x", "prompt": []}', "the list is empty", "prompt"),
    ('{"model": "x", "prompt": [[]]}', "the prompt is empty", "prompt"),
    ('{"model": "x", "prompt": [' + "1," * 32 + "1]}", "longer than the model's context", "prompt"),
    ('{"model": "x", "prompt": "hi", "logprobs": 21}', "less than or equal to 20", "logprobs"),
    ('{"model": "x", "prompt": "hi", "suffix": "x"}', "not supported", "suffix"),
]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    for body, words, param in BAD:
        status, text = server.http("POST", "/v1/completions", body)
        assert status == 400, (body, status, text)
        err = json.loads(text)["error"]
        assert words in err["message"] and err["param"] == param, (body, err)
        assert err["type"] == "invalid_request_error" and "Traceback" not in text
    status, text = server.http("GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(text)
    with pytest.raises(openai.BadRequestError, match="limit of 4000"):
        server.client.completions.create(model="tiny", prompt="hi", max_tokens=5000)
    res = server.client.completions.create(model="tiny", prompt="hi", max_tokens=5)
    assert res.usage.completion_tokens == 5 and server.proc.poll() is None


def test_a_client_that_goes_away_frees_its_slot_and_health_answers(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    body = {"model": "x", "prompt": "hi", "max_tokens": 4000, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: {")  # generation is under way
    assert server.http("GET", "/health") == (200, '{"status":"ok"}')
    assert server.stats()["running"] == 1
    conn.close()  # mid-stream
    deadline = time.monotonic() + 60
    while server.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stats()["running"] == 0
    while not any("cancelled" in line for line in server.lines) and time.monotonic() < deadline:
        time.sleep(0.05)  # the log line travels through the server's stderr
    assert any("cancelled" in line for line in server.lines)


def test_bench_serve_clients_measure_the_server(server, backend):
    """bench-serve's closed-loop clients, briefly: counts come from the server's usage."""
    body = {"model": "x", "prompt": "\n", "max_tokens": 8, "temperature": 0.8}
    runs = [run_clients(server, clients=3, duration=0.3, body=body, seed=s) for s in (0, 9)]
    r = summarize(backend, 3, runs)
    assert r.requests >= 6 and r.clients == 3 and r.batch_max >= 1
    assert r.tokens_per_s * r.seconds == pytest.approx(8 * r.requests)
    # staggered: each client's first request asks for (i + 1) / 3 of max_tokens (2, 5, 8)
    spread = run_clients(server, clients=3, duration=0.3, body=body, stagger=True)
    assert sum(q.tokens for q in spread.requests) == 8 * len(spread.requests) - (6 + 3)
    assert 0 < r.ttft_p50_ms <= r.ttft_p99_ms and backend in format_row(r)
    # the server's own time to first token: one per request, within what the clients saw
    # (it starts later and ends earlier; its histogram keeps 2 significant digits)
    assert sum(sum(run.ttft_ms.values()) for run in runs) == r.requests
    assert 0 < r.server_ttft_p50_ms <= 1.05 * r.ttft_p50_ms
    # and the part of it each request waited for its prefill to begin: one each, never longer
    st = server.stats()
    queue, ttft = ({float(k): v for k, v in st[h].items()} for h in ("queue_ms", "ttft_ms"))
    assert sum(queue.values()) == sum(ttft.values()) and max(queue) <= max(ttft)


# ---- log-probabilities, chat, backpressure -----------------------------------------------


def test_token_id_prompts_answer_as_the_same_text(server, lm):
    """lm-eval's local-completions scores with token ids, echo, logprobs 1 and max_tokens 1."""
    texts = ["ROMEO:", "KING", "O, "]
    kw = dict(model="tiny", max_tokens=1, temperature=0, echo=True, logprobs=1)
    by_text = server.client.completions.create(prompt=texts, **kw)
    by_ids = server.client.completions.create(prompt=[lm.encode(t) for t in texts], **kw)
    assert [c.model_dump() for c in by_ids.choices] == [c.model_dump() for c in by_text.choices]
    assert by_ids.choices[0].text.startswith("ROMEO:")
    assert len(by_ids.choices[0].logprobs.token_logprobs) == len("ROMEO:") + 1
    one = server.client.completions.create(
        model="tiny", prompt=lm.encode("ROMEO:"), max_tokens=20, temperature=0.8, seed=2
    )
    want = one_by_one(lm, "ROMEO:", max_new_tokens=20, temperature=0.8, seed=2)
    assert one.choices[0].text == want[0] and one.usage.prompt_tokens == 6


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_the_whole_completions(server, lm, echo):
    """Entry for entry; with echo, the prompt's come first (its first token unscored)."""
    kw = dict(model="tiny", prompt="JULIET:", max_tokens=40, temperature=0.9, seed=11, n=2)
    kw.update(logprobs=2, stop=["\n\n", "the"], echo=echo)
    whole = server.client.completions.create(**kw)
    got = {k: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
           for k in range(2)}  # fmt: skip
    text = ["", ""]
    for chunk in server.client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            text[c.index] += c.text
            for key, v in (c.logprobs.model_dump() if c.logprobs else {}).items():
                got[c.index][key] += v
    for c in whole.choices:
        assert text[c.index] == c.text and c.text.startswith("JULIET:") == echo
        assert got[c.index] == c.logprobs.model_dump()
        assert "".join(got[c.index]["tokens"]) == c.text
        assert (got[c.index]["token_logprobs"][0] is None) == echo
    if echo:
        return
    chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=12)
    chat.update(temperature=0.5, seed=3, logprobs=True, top_logprobs=2)
    whole = server.client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [
        e
        for chunk in server.client.chat.completions.create(**chat, stream=True)
        for c in chunk.choices
        if c.logprobs
        for e in c.logprobs.content
    ]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]


def test_no_max_tokens_generates_up_to_the_context(server, lm):
    res = server.client.completions.create(model="tiny", prompt="ROMEO:", temperature=0)
    block = lm.spec.block_size
    assert res.usage.completion_tokens == block - 6 and res.choices[0].finish_reason == "length"


def test_prompt_logprobs_equal_polygpt_eval_and_token_logprobs(server, lm):
    from polygpt.evaluate import token_nll

    text = "ROMEO:\nWhat say you?"
    res = server.client.completions.create(
        model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=2
    )
    lp = res.choices[0].logprobs
    assert res.choices[0].text == text and lp.tokens == list(text) and lp.token_logprobs[0] is None
    ids = np.array(lm.encode(text))
    block = lm.spec.block_size
    nll = token_nll(lm.backend, lm.model, ids, block, stride=block, batch_size=1)
    np.testing.assert_allclose(lp.token_logprobs[1:], -nll, rtol=0, atol=1e-6)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == list(range(len(text)))
    greedy = server.client.completions.create(
        model="tiny", prompt="KING", max_tokens=8, temperature=0, logprobs=3
    )
    lp = greedy.choices[0].logprobs
    assert "".join(lp.tokens) == greedy.choices[0].text and len(lp.token_logprobs) == 8
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen == pytest.approx(max(top.values())) and chosen < 0


def test_chat_completions_plain_and_streamed(server, lm):
    messages = [{"role": "system", "content": "Go"}, {"role": "user", "content": "Hi"}]
    kw = dict(model="tiny", messages=messages, max_tokens=40, temperature=0.8, seed=4)
    res = server.client.chat.completions.create(**kw, logprobs=True, top_logprobs=1)
    prompt = "system: Go\nuser: Hi\nassistant:"
    want = lm.generate([prompt], GenerationConfig(40, 0.8, seed=4, stop=["\nuser:"]))[0]
    msg = res.choices[0].message
    assert res.object == "chat.completion" and msg.role == "assistant" and msg.content == want
    assert res.usage.prompt_tokens == len(prompt)
    content = res.choices[0].logprobs.content
    assert "".join(c.token for c in content) == want and len(content[0].top_logprobs) == 1
    stream = server.client.chat.completions.create(**kw, stream=True)
    parts, finish = [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == want and finish == res.choices[0].finish_reason


def test_a_full_queue_answers_429_and_serving_goes_on(tiny_ckpt, backend):
    s = start(tiny_ckpt, backend, "--max-batch", "1", "--max-queue", "1")
    try:
        conns = []
        for _ in range(2):  # one runs, one waits
            conn = http.client.HTTPConnection(s.host, s.port, timeout=60)
            body = {"model": "x", "prompt": "hi", "max_tokens": 2000, "stream": True}
            conn.request(
                "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
            )
            conns.append(conn)
        deadline = time.monotonic() + 60
        while s.stats()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as err:
            s.client.completions.create(model="tiny", prompt="hi", max_tokens=5)
        assert err.value.response.headers["retry-after"] == "1"
        assert "queue is full" in err.value.message
        for conn in conns:
            conn.close()
        deadline = time.monotonic() + 60
        while (s.stats()["running"] or s.stats()["waiting"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        res = s.client.completions.create(model="tiny", prompt="hi", max_tokens=5)
        assert res.usage.completion_tokens == 5
    finally:
        s.close()
