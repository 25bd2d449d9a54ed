"""The server under a hostile client (loopback only): 50 concurrent requests get answers (200
or 503), never connection resets, with a bounded number of threads; malformed bodies (deep
nesting, huge top_k, too many prompts) are 400s, never dropped connections or 500s."""

import http.client
import json
import threading

import pytest

from advgame_jax.sampling import Completion
from advgame_jax.sampling.openai_protocol import Limits
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
        return [[Completion((5,), "ok", (-0.5,), "length")] * (len(p) * sp.n)
                for p, sp in requests]


def _post(url, body, raw=None):
    """(status, JSON body) over a fresh connection; a reset raises."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", "/v1/completions", body=data,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    build_tiny_tokenizer(path)
    return ChatTokenizer.from_dir(path)


def test_fifty_concurrent_requests_get_answers_not_resets(tokenizer):
    sampler = _SlowSampler()
    config = ServerConfig(port=0, queue_size=4, max_connections=6, max_overflow=6,
                          listen_backlog=128, limits=LIMITS)
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
    # Server-side threads never exceeded workers + overflow (+ the accept and queue threads).
    assert peak[0] - baseline - 50 <= 6 + 6 + 2


@pytest.mark.parametrize("body,raw,needle", [
    (None, b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ({"prompt": "x", "top_k": 10**12}, None, "'top_k' must be in"),
    ({"prompt": ["a", "b", "c"], "n": 2}, None, "3 prompts × n=2 = 6 completions"),
    ({"prompt": ["a"] * 5000}, None, "5000 prompts"),
    ({"prompt": "x", "seed": "12"}, None, "'seed' must be an integer"),
    ({"prompt": "x", "stop_token_ids": [10**30]}, None, "outside"),
])
def test_malformed_bodies_are_400(tokenizer, body, raw, needle):
    sampler = _SlowSampler()
    sampler.release.set()
    with OpenAIServer(sampler, tokenizer, ServerConfig(port=0, limits=LIMITS)) as srv:
        status, err = _post(srv.url, body, raw)
        assert status == 400, err
        assert needle in err["error"]["message"]
        assert _post(srv.url, {"prompt": "x", "max_tokens": 1})[0] == 200  # still serving
