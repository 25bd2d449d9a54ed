"""The server under a hostile client (loopback only): 50 concurrent requests get answers (200
or 503 with Retry-After), never connection resets, without a thread per connection; malformed
bodies (deep nesting, huge top_k, too many prompts) are 400s, never dropped connections or
500s; slow-header and slow-body clients are cut off by the read deadline while others are
served."""

import http.client
import json
import socket
import threading
import time

import openai
import pytest

from advgame_jax.sampling import Completion
from advgame_jax.sampling.openai_schema import Limits
from advgame_jax.sampling.server import OpenAIServer, ServerConfig
from advgame_jax.tokenization import ChatTokenizer, build_tiny_tokenizer

LIMITS = Limits(max_prompt_tokens=48, max_tokens=16, default_max_tokens=8, max_n=4)


class _SlowSampler:
    """Answers after ``release`` is set, recording the largest number of live threads."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def generate_many(self, requests):
        assert self.release.wait(60)
        self.calls += 1
        return [[Completion((5,), "ok", (-0.5,), "length")] * (len(p) * sp.n) for p, sp in requests]


def _post(url, body, raw=None):
    """(status, JSON body) over a fresh connection; a reset raises."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", "/v1/completions", body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    if resp.status == 503:
        assert int(resp.getheader("Retry-After")) >= 1
    conn.close()
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    build_tiny_tokenizer(path)
    return ChatTokenizer.from_dir(path)


def test_fifty_concurrent_requests_get_answers_not_resets(tokenizer):
    sampler = _SlowSampler()
    config = ServerConfig(port=0, queue_size=4, listen_backlog=128, limits=LIMITS)
    srv = OpenAIServer(sampler, tokenizer, config).start()
    results, errors = {}, {}
    baseline = threading.active_count()
    peak = [0]

    def one(i):
        try:
            results[i] = _post(srv.url, {"prompt": "x", "max_tokens": 1})
        except Exception as e:  # noqa: BLE001 - a reset or refused connection is a failure
            errors[i] = repr(e)

    clients = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in clients:
        t.start()
        peak[0] = max(peak[0], threading.active_count())
    # Let the overflow answer while the workers are held, then release them.
    threading.Event().wait(2.0)
    peak[0] = max(peak[0], threading.active_count())
    sampler.release.set()
    for t in clients:
        t.join(120)
    srv.shutdown()
    assert not errors, errors
    statuses = [results[i][0] for i in range(50)]
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses
    busy = [results[i][1]["error"]["code"] for i in range(50) if results[i][0] == 503]
    assert set(busy) <= {"server_overloaded"}
    # No thread per connection: the server runs on its event-loop and worker threads.
    assert peak[0] - baseline - 50 <= 2


@pytest.mark.parametrize(
    "body,raw,needle",
    [
        (None, b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        ({"prompt": "x", "top_k": 10**12}, None, "'top_k' must be in"),
        ({"prompt": ["a", "b", "c"], "n": 2}, None, "3 prompts × n=2 = 6 completions"),
        ({"prompt": ["a"] * 5000}, None, "5000 prompts"),
        ({"prompt": "x", "seed": "12"}, None, "'seed' must be an integer"),
        ({"prompt": "x", "stop_token_ids": [10**30]}, None, "outside"),
    ],
)
def test_malformed_bodies_are_400(tokenizer, body, raw, needle):
    sampler = _SlowSampler()
    sampler.release.set()
    with OpenAIServer(sampler, tokenizer, ServerConfig(port=0, limits=LIMITS)) as srv:
        status, err = _post(srv.url, body, raw)
        assert status == 400, err
        assert needle in err["error"]["message"]
        assert _post(srv.url, {"prompt": "x", "max_tokens": 1})[0] == 200  # still serving


def _closed_by_server(sock, until: float) -> bool:
    """True once the server closed ``sock`` (EOF or reset) before ``until``."""
    sock.settimeout(0.2)
    while time.monotonic() < until:
        try:
            if sock.recv(4096) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset
            return True
    return False


def test_slow_header_and_body_clients_are_cut_off_without_starving_others(tokenizer):
    sampler = _SlowSampler()
    sampler.release.set()
    deadline_s = 3.0
    config = ServerConfig(port=0, read_timeout_s=deadline_s, limits=LIMITS)
    with OpenAIServer(sampler, tokenizer, config) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        opened = time.monotonic()
        slow = []
        for _ in range(70):  # one header line now, the next one 5 s later (never reached)
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        body = socket.create_connection((host, int(port)), timeout=10)
        body.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b'application/json\r\nContent-Length: 400\r\n\r\n{"prompt": '
        )
        slow.append(body)
        client = openai.OpenAI(
            base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=10
        )
        t0 = time.monotonic()
        assert [m.id for m in client.models.list().data] == ["advgame"]
        assert time.monotonic() - t0 < 2.0
        assert time.monotonic() - opened < deadline_s  # the slow ones were still open
        trickle_until = opened + deadline_s + 5
        for s in slow:  # every one is closed by the deadline, not by the client
            if s is not body:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
            assert _closed_by_server(s, trickle_until)
            s.close()
        assert time.monotonic() - opened < deadline_s + 5
        # ... and the server still answers, also with a kept-alive connection.
        assert _post(srv.url, {"prompt": "x", "max_tokens": 1})[0] == 200
        assert client.models.list().data[0].id == "advgame"
