"""The OpenAI-compatible server answers a real HTTP client (urllib / http.client) on loopback:
endpoints, validation errors, body and prompt limits, API key, queueing (503 + Retry-After),
batching, shutdown, top_logprobs against torch, and the attacker-checkpoint guard."""

import http.client
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax.numpy as jnp
import pytest

from advgame_jax.sampling import Completion, SamplingParams
from advgame_jax.sampling.openai_schema import Limits
from advgame_jax.sampling.servable import AttackerCheckpointError, make_tiny_model_dir
from advgame_jax.sampling.server import OpenAIServer, ServerConfig, serve_model_dir
from advgame_jax.tokenization import ChatTokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
LIMITS = Limits(max_prompt_tokens=48, max_tokens=16, default_max_tokens=8, max_n=4)
CONFIG = ServerConfig(port=0, max_body_bytes=16 * 1024, queue_size=8, limits=LIMITS)


def call(url, path, body=None, *, method=None, headers=None, raw=None, with_headers=False):
    """(status, parsed JSON[, headers]) of one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(
        url + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:  # compiles on a loaded CPU
            out = resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        out = err.code, json.loads(err.read()), err.headers
    return out if with_headers else out[:2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_serve")))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = serve_model_dir(model_dir, config=CONFIG, compute_dtype=jnp.float32)
    with srv:
        yield srv


def test_models_endpoint(server):
    status, body = call(server.url, "/v1/models")
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["advgame"]
    assert server.url.startswith("http://127.0.0.1:")


def test_chat_completion_matches_the_sampler(server):
    req = {
        "model": "advgame",
        "messages": [{"role": "user", "content": "tell me the steps"}],
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
    }
    status, body = call(server.url, "/v1/chat/completions", req)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    (choice,) = body["choices"]
    tok = server.tokenizer
    prompt = tok.render_user_turn("tell me the steps")
    (want,) = server.sampler.generate(
        [prompt],
        SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=tok.stop_token_ids),
    )
    assert choice["message"] == {"role": "assistant", "content": want.text}
    assert choice["finish_reason"] == want.finish_reason
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == pytest.approx(want.logprobs)
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(want.token_ids),
        "total_tokens": len(prompt) + len(want.token_ids),
    }


def test_completions_endpoint_text_and_token_prompts(server):
    req = {
        "prompt": ["first then", "sure here"],
        "n": 2,
        "max_tokens": 6,
        "temperature": 0.9,
        "top_p": 0.9,
        "seed": 11,
        "ignore_eos": True,
        "logprobs": 0,
    }
    status, body = call(server.url, "/v1/completions", req)
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(
        c["finish_reason"] == "length" and len(c["logprobs"]["tokens"]) == 6
        for c in body["choices"]
    )
    assert body["usage"]["completion_tokens"] == 24
    again = call(server.url, "/v1/completions", req)[1]
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]]
    ids = server.tokenizer.encode("first then")
    status, body = call(
        server.url, "/v1/completions", {"prompt": ids, "max_tokens": 4, "temperature": 0}
    )
    assert status == 200 and len(body["choices"]) == 1


def test_stop_string_cuts_the_text(server):
    base = {"prompt": "steps first", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    text = call(server.url, "/v1/completions", base)[1]["choices"][0]["text"]
    stop = text[4:6]
    assert stop and len(text) > 6
    status, body = call(server.url, "/v1/completions", dict(base, stop=[stop]))
    assert status == 200
    assert body["choices"][0]["text"] == text[: text.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/v1/chat/completions", {"max_tokens": 4}, 400, "'messages' is required"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "non-empty list"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            400,
            "'temperature' must be a number",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "temperature": 5},
            400,
            "'temperature' must be in",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "n": 0},
            400,
            "'n' must be in",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "n": 99},
            400,
            "'n' must be in",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "'max_tokens' must be in",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000},
            400,
            "'max_tokens' must be in",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_p": 0},
            400,
            "'top_p' must be in",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            400,
            "'stream' must be a boolean",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            400,
            "'top_logprobs' must be in [0, 20]",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "needs 'logprobs': true",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            400,
            "chat template",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "model": "gpt-x"},
            404,
            "does not exist",
        ),
        ("/v1/completions", {"max_tokens": 3}, 400, "'prompt' is required"),
        ("/v1/completions", {"prompt": [1, "a"]}, 400, "'prompt' must be"),
        ("/v1/completions", {"prompt": [10**9]}, 400, "outside"),
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "'logprobs' must be in [0, 5]"),
        ("/v1/completions", ["not", "an", "object"], 400, "JSON object"),
    ],
)
def test_invalid_requests_get_4xx_with_a_message(server, path, body, status, needle):
    got, err = call(server.url, path, body)
    assert got == status
    assert needle in err["error"]["message"]
    assert set(err["error"]) >= {"message", "type", "code"}


def test_malformed_json_unknown_routes_and_methods(server):
    status, err = call(server.url, "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in err["error"]["message"]
    # A lone surrogate escape: one clean 400 that names it, no codec or parser internals.
    for text in ("\\ud800", "a\\udc00b"):
        raw = b'{"messages": [{"role": "user", "content": "' + text.encode() + b'"}]}'
        status, err = call(server.url, "/v1/chat/completions", raw=raw)
        message = err["error"]["message"]
        assert status == 400 and "lone UTF-16 surrogate" in message, message
        assert "Error" not in message and "codec" not in message and "line 1" not in message
    assert call(server.url, "/v1/nothing", {})[0] == 404
    assert call(server.url, "/v1/chat/completions", method="GET")[0] == 405


def test_oversize_bodies_and_prompts_are_rejected(server):
    big = {"prompt": "a" * (CONFIG.max_body_bytes + 10)}
    status, err = call(server.url, "/v1/completions", big)
    assert status == 413 and err["error"]["code"] == "request_too_large"
    # A Content-Length far above the limit is answered from the header alone.
    conn = http.client.HTTPConnection(server.url.split("//")[1], timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    status, err = call(server.url, "/v1/completions", {"prompt": "sure " * 200})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    # ... and the server still works afterwards.
    assert call(server.url, "/v1/models")[0] == 200


def test_api_key_is_enforced(server):
    keyed = OpenAIServer(
        server.sampler, server.tokenizer, ServerConfig(port=0, api_key="s3cret", limits=LIMITS)
    )
    with keyed:
        assert call(keyed.url, "/v1/models")[0] == 401
        assert call(keyed.url, "/v1/models", headers={"Authorization": "Bearer nope"})[0] == 401
        status, err = call(keyed.url, "/v1/completions", {"prompt": "x"})
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        ok = {"Authorization": "Bearer s3cret"}
        assert call(keyed.url, "/v1/models", headers=ok)[0] == 200
        status, _ = call(
            keyed.url,
            "/v1/completions",
            {"prompt": "x", "max_tokens": 2, "temperature": 0},
            headers=ok,
        )
        assert status == 200


class _BlockingSampler:
    """Records the batches it serves; blocks until released."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.batches = []

    def generate_many(self, requests):
        self.started.set()
        assert self.release.wait(60)
        self.batches.append(len(requests))
        return [[Completion((5,), "ok", (-0.5,), "length")] * (len(p) * sp.n) for p, sp in requests]


def _post_async(url, results, i):
    results[i] = call(url, "/v1/completions", {"prompt": "x", "max_tokens": 1})


def test_queue_bound_batching_and_graceful_shutdown(model_dir):
    tok = ChatTokenizer.from_dir(model_dir)
    sampler = _BlockingSampler()
    srv = OpenAIServer(sampler, tok, ServerConfig(port=0, queue_size=3, limits=LIMITS)).start()
    results = {}
    first = threading.Thread(target=_post_async, args=(srv.url, results, 0))
    first.start()
    assert sampler.started.wait(30)  # the worker holds request 0
    waiting = [threading.Thread(target=_post_async, args=(srv.url, results, i)) for i in (1, 2, 3)]
    for t in waiting:
        t.start()
    deadline = time.time() + 30
    while len(srv._waiting) < 3 and time.time() < deadline:
        time.sleep(0.01)
    status, err, headers = call(srv.url, "/v1/completions", {"prompt": "x"}, with_headers=True)
    assert status == 503 and err["error"]["code"] == "server_overloaded"
    assert int(headers["Retry-After"]) >= 1 and int(headers["retry-after-ms"]) > 0
    closer = threading.Thread(target=srv.shutdown)
    closer.start()  # graceful: the queued requests are still served
    time.sleep(0.2)
    sampler.release.set()
    for t in [first, *waiting, closer]:
        t.join(60)
    assert [results[i][0] for i in range(4)] == [200] * 4
    assert results[1][1]["choices"][0]["text"] == "ok"
    assert sampler.batches == [1, 3]  # the three waiting requests shared one generate call
    with pytest.raises(OSError):
        call(srv.url, "/v1/models")


def _mark(src, dst, how):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((pathlib.Path(src) / f).read_bytes())
    if how == "marker":
        (dst / "ADVGAME_ATTACKER").write_text("attacker\n")
    else:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["advgame_controlled_artifact"] = "attacker"
        (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("how", ["marker", "config_field"])
def test_attacker_checkpoint_needs_explicit_flag(model_dir, tmp_path, how):
    attacker = _mark(model_dir, tmp_path / "attacker", how)
    with pytest.raises(AttackerCheckpointError, match="allow_attacker"):
        serve_model_dir(attacker, config=CONFIG)
    allowed = serve_model_dir(attacker, config=CONFIG, allow_attacker=True)
    allowed.shutdown()  # never started: just closes the socket


def test_launch_script_refuses_attacker_without_flag(model_dir, tmp_path):
    attacker = _mark(model_dir, tmp_path / "attacker", "marker")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "serve.py"), f"--model_dir={attacker}", "--port=0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode != 0
    assert "--allow_attacker" in proc.stderr


def test_top_logprobs_match_torch(server, model_dir):
    """Chat top_logprobs (and completions' logprobs=k) are the k most likely tokens of the
    model at each generated position, as torch transformers computes them."""
    import torch
    from transformers import AutoModelForCausalLM

    req = {
        "messages": [{"role": "user", "content": "first steps"}],
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 4,
    }
    status, body = call(server.url, "/v1/chat/completions", req)
    assert status == 200, body
    tok = server.tokenizer
    prompt = tok.render_user_turn("first steps")
    (want,) = server.sampler.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=6))
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(want.token_ids)])).logits[0]
    ref = torch.log_softmax(logits.double(), -1)[len(prompt) - 1 : -1]
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == len(want.token_ids) == 6
    for j, entry in enumerate(entries):
        vals, ids = ref[j].topk(4)
        assert [t["token"] for t in entry["top_logprobs"]] == [
            tok.decode([int(i)], skip_special_tokens=False) for i in ids
        ]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(
            vals.tolist(), abs=2e-4
        )
        assert entry["logprob"] == pytest.approx(float(ref[j, want.token_ids[j]]), abs=2e-4)
    status, body = call(
        server.url,
        "/v1/completions",
        {
            "prompt": list(prompt),
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 2,
        },
    )
    assert status == 200, body
    tops = body["choices"][0]["logprobs"]["top_logprobs"]
    assert [max(t, key=t.get) for t in tops] == [e["token"] for e in entries]
