"""advgame_jax.net: the pooled HTTP client against scripted servers on 127.0.0.1
(tests/fake_judge_server.py): keep-alive reuse, the wall-clock deadline against servers
trickling headers or body, Retry-After, the fault kinds, and the failure-rate warning."""

import email.utils
import logging
import socket
import time

import pytest

from advgame_jax.net import (
    Client,
    DeadlineExceeded,
    FailureRateMonitor,
    HTTPStatusError,
    MalformedResponse,
    ReplicaRouter,
    Unreachable,
    chat_text,
    served_models,
)
from tests.fake_judge_server import FakeJudgeServer

CHAT = {"model": "m", "messages": [{"role": "user", "content": "q"}]}


def _closed_port_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/v1"


def test_keep_alive_reuses_one_connection_and_sends_the_key():
    with FakeJudgeServer(lambda p, h: ("ok", f"answer {h}"), models=("a", "b")) as s:
        with Client([s.url], api_key="sk-x", timeout_s=5) as c:
            out = [c.post("/chat/completions", CHAT, parse=chat_text) for _ in range(10)]
            models = c.get("/models", parse=served_models)
            assert "sk-x" not in repr(c)
        assert out == [f"answer {i}" for i in range(10)] and models == ["a", "b"]
        assert s.connections == 1  # pooled keep-alive: 11 requests, one TCP connection
        assert {r["auth"] for r in s.requests} == {"Bearer sk-x"}
    assert c.fault_counts() == {}


@pytest.mark.parametrize("action", [("trickle", 0.2, "x" * 400), ("trickle_headers", 0.2)])
def test_deadline_holds_against_a_trickling_server(action):
    """Bytes keep coming (every 0.2 s, so no per-read timeout fires): the request still ends
    at its 2 s deadline, as a timeout, and is not retried past it."""
    with FakeJudgeServer(lambda p, h: action) as s:
        c = Client([s.url], timeout_s=2.0, max_retries=5, backoff_s=0.01)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="2 s deadline"):
            c.post("/chat/completions", CHAT)
        elapsed = time.monotonic() - t0
        hits = s.hits
    assert 1.9 <= elapsed <= 3.0, elapsed
    assert hits == 1 and c.fault_counts() == {"timeout": 1, "failed_requests": 1}


def test_retry_after_is_honoured_in_seconds_and_as_a_date():
    def in_4s():  # an HTTP date made when the answer is sent (whole seconds: 3 to 4 s ahead)
        return email.utils.formatdate(time.time() + 4.0, usegmt=True)

    for value, lo, hi in ((lambda: "2", 2.0, 2.0), (in_4s, 1.5, 4.0)):
        sleeps = []

        def script(p, h, value=value):
            if h == 0:
                return ("status", 503, b'{"error": "busy"}', {"Retry-After": value()})
            return ("ok", "fine")

        with FakeJudgeServer(script) as s:
            c = Client([s.url], timeout_s=10, max_retries=2, backoff_s=0.01, sleep=sleeps.append)
            assert c.post("/chat/completions", CHAT, parse=chat_text) == "fine"
        assert len(sleeps) == 1 and lo <= sleeps[0] <= hi, sleeps
        assert c.fault_counts() == {"http_5xx": 1, "retries": 1}
    # A Retry-After past the deadline: no pointless wait, the request fails at once.
    sleeps = []
    busy = ("status", 429, b"slow down", {"Retry-After": "60"})
    with FakeJudgeServer(lambda p, h: busy) as s:
        c = Client([s.url], timeout_s=5, max_retries=3, sleep=sleeps.append)
        with pytest.raises(HTTPStatusError) as info:
            c.post("/chat/completions", CHAT)
        assert s.hits == 1
    assert sleeps == [] and info.value.code == 429 and info.value.retry_after == 60.0
    assert c.fault_counts() == {"http_429": 1, "failed_requests": 1}


def test_status_error_carries_code_and_body_excerpt_and_4xx_is_not_retried():
    body = b'{"error": "model not found"}' + b" " * 1000 + b"END"
    with FakeJudgeServer(lambda p, h: ("status", 404, body)) as s:
        c = Client([s.url], timeout_s=5, max_retries=3, sleep=lambda t: None)
        with pytest.raises(HTTPStatusError) as info:
            c.post("/chat/completions", CHAT)
        assert s.hits == 1
    err = info.value
    assert err.code == 404 and err.kind == "http_4xx" and not err.retryable
    assert err.body_excerpt.startswith('{"error": "model not found"}')
    assert len(err.body_excerpt) == 200 and "END" not in err.body_excerpt
    assert "/v1/chat/completions" in str(err) and "HTTP 404" in str(err)


def test_malformed_bodies_are_retried_then_raised():
    with FakeJudgeServer(lambda p, h: ("raw", b'{"choices": [')) as s:
        c = Client([s.url], timeout_s=5, max_retries=1, sleep=lambda t: None)
        with pytest.raises(MalformedResponse, match="not JSON"):
            c.post("/chat/completions", CHAT)
        assert s.hits == 2
        with pytest.raises(MalformedResponse, match="larger than 10 bytes"):
            Client([s.url], max_body_bytes=10, max_retries=0).post("/chat/completions", CHAT)
    with FakeJudgeServer(lambda p, h: ("raw", b'{"choices": []}')) as s:
        with pytest.raises(MalformedResponse, match="IndexError"):
            Client([s.url], max_retries=0).post("/chat/completions", CHAT, parse=chat_text)
    assert c.fault_counts() == {"malformed_json": 2, "retries": 1, "failed_requests": 1}


def test_unreachable_is_retried_with_backoff_then_raised():
    sleeps = []
    c = Client(
        [_closed_port_url()], timeout_s=5, max_retries=2, backoff_s=0.1, seed=3, sleep=sleeps.append
    )
    with pytest.raises(Unreachable) as info:
        c.get("/models")
    assert isinstance(info.value, ConnectionError) and "/v1/models" in str(info.value)
    assert len(sleeps) == 2 and 0.1 <= sleeps[0] < 0.2 and 0.2 <= sleeps[1] < 0.4
    assert c.fault_counts() == {"connection": 3, "retries": 2, "failed_requests": 1}
    # A probe (count=False) leaves counts and health alone.
    with pytest.raises(Unreachable):
        c.get("/models", max_retries=0, count=False)
    assert c.fault_counts()["connection"] == 3 and c.endpoint_health()[0]["attempts"] == 3


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="--x: expected an http"):
        Client(["host:1/v1"], field="--x")
    with pytest.raises(ValueError, match="timeout_s > 0"):
        Client(["http://127.0.0.1:1/v1"], timeout_s=0)


def test_failure_rate_warns_from_the_first_batch_then_once_per_window(caplog):
    mon = FailureRateMonitor(
        threshold=0.25,
        every=3,
        what="TEST",
        consequence="counted",
        details=lambda: "Endpoints: e1 up.",
        logger="advgame_jax.test",
    )
    with caplog.at_level(logging.WARNING, logger="advgame_jax.test"):
        fired = [mon.note(4, 4)] + [mon.note(4, 4) for _ in range(6)]
    assert fired == [True, False, False, True, False, False, True]
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == (
        "TEST FAILURE RATE 100.0% over the last 1 batch (4 of 4 requests failed "
        "after retries; threshold 25.0%); counted. Endpoints: e1 up."
    )
    assert "over the last 3 batches (12 of 12" in msgs[1]
    # Under the threshold nothing is logged, and a healthy window resets the rate.
    quiet = FailureRateMonitor(threshold=0.25, every=2)
    assert [quiet.note(4, 1) for _ in range(4)] == [False] * 4
    assert quiet.note(4, 2) is True and quiet.warnings_logged == 1


def test_router_waits_for_a_slot_at_most_its_timeout():
    router = ReplicaRouter(["http://a/v1", "http://b/v1"], max_in_flight_per_endpoint=1)
    first, second = router.acquire(), router.acquire()
    assert {first.base, second.base} == {"http://a/v1", "http://b/v1"}
    t0 = time.monotonic()
    assert router.acquire(timeout=0.3) is None  # both slots taken: gives up, no hang
    assert 0.25 <= time.monotonic() - t0 < 1.0
    router.release(first, ok=True)
    assert router.acquire(timeout=0.3) is first
