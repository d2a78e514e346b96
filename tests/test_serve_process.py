"""`polygpt serve`'s two processes: the HTTP server and the engine process it starts. A killed
engine ends every open request with an error and stops the server with a non-zero exit (never a
hang); SIGTERM lets in-flight requests finish; no engine process outlives its server
(ServerProcess.close checks that after every server test too). No assertion depends on speed:
waits are generous bounds, and every request outlives the event it waits for."""

from __future__ import annotations

import http.client
import json
import os
import signal

import pytest

from .conftest import requires

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from polygpt.bench.serving import ServerProcess, alive  # noqa: E402

pytestmark = requires("torch")


def _stream(server: ServerProcess, max_tokens: int) -> http.client.HTTPResponse:
    """A streaming completion whose first chunk has arrived (it is running in the engine)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    body = {"prompt": "hi", "max_tokens": max_tokens, "stream": True, "temperature": 0.8}
    body["stream_options"] = {"include_usage": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: {")
    return r


def _rest(r: http.client.HTTPResponse) -> list[str]:
    return [ln for ln in r.read().decode().splitlines() if ln.startswith("data: ")]


def test_a_killed_engine_fails_open_requests_and_the_server_exits_non_zero(tiny_ckpt):
    s = ServerProcess(tiny_ckpt, "torch", "-d", "cpu", "--max-tokens-limit", "100000")
    try:
        assert s.stats()["engine_pid"] == s.engine_pid
        streams = [_stream(s, 100000) for _ in range(2)]
        os.kill(s.engine_pid, signal.SIGKILL)
        for r in streams:
            errors = [json.loads(ln[6:]) for ln in _rest(r) if ln.startswith('data: {"error"')]
            assert len(errors) == 1 and "engine process died" in errors[0]["error"]["message"]
        assert s.proc.wait(60) != 0
        assert any("engine process died" in line for line in s.lines)
    finally:
        s.close()


def test_sigterm_lets_in_flight_requests_finish(tiny_ckpt):
    s = ServerProcess(tiny_ckpt, "torch", "-d", "cpu")
    try:
        r = _stream(s, 300)
        s.proc.send_signal(signal.SIGTERM)
        rest = _rest(r)
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 300
        assert s.proc.wait(60) == 0
        s.check_no_orphan()
    finally:
        s.close()


def test_a_killed_server_leaves_no_engine_process(tiny_ckpt):
    s = ServerProcess(tiny_ckpt, "torch", "-d", "cpu")
    try:
        _stream(s, 300)
        s.proc.kill()
        s.proc.wait(60)
        s.check_no_orphan()  # the engine saw its pipe close
        assert not alive(s.engine_pid)
    finally:
        s.close()


def test_a_first_token_is_handed_out_at_once_and_ahead_of_other_streams():
    """Events are held for the client's interval, except a request's first token: its job's
    events go out at once, before the held ones (which wait for the interval's timer)."""
    import asyncio

    from polygpt import engine as eng
    from polygpt.engine_process import TEXT, EngineClient

    async def run() -> list:
        c = EngineClient.__new__(EngineClient)  # no engine process: the pipe's reader only
        c.interval, c._pending, c._timer, c._last, c._stats = 60.0, {}, None, 0.0, {}
        handed: list = []
        c.deliver = lambda by_owner: handed.append(list(by_owner))
        old, new = eng.Request(prompt=[1]), eng.Request(prompt=[2])
        old.t_first = 1.0  # streaming already
        c.open = {0: (old, "old", 0), 1: (new, "new", 0)}
        c._handle(("step", [(0, TEXT, "a", [], None)], 2, 0, 2))  # first hand-out: at once
        c._handle(("step", [(0, TEXT, "b", [], None)], 2, 0, 2))  # held for the interval
        c._handle(("step", [(0, TEXT, "c", [], None), (1, TEXT, "x", [], None)], 2, 0, 2))
        assert c._timer is not None
        c._timer.cancel()
        return handed, c._pending

    handed, held = asyncio.run(run())
    assert handed == [["old"], ["new"]]
    assert [ev.text for _, ev in held["old"]] == ["b", "c"]
