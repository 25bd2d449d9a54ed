"""The server under 100 concurrent official ``openai`` clients (loopback, tiny real model):
with room in the queue every request succeeds; with a short queue the overflow gets 503 with
Retry-After and the clients' default retries then succeed. Streaming chat completions carry
the same tokens as the non-streamed greedy answer."""

import threading
import time

import jax.numpy as jnp
import openai
import pytest

from advgame_jax.sampling import SamplingParams
from advgame_jax.sampling.openai_schema import Limits
from advgame_jax.sampling.servable import make_tiny_model_dir
from advgame_jax.sampling.server import OpenAIServer, ServerConfig, serve_model_dir

LIMITS = Limits(max_prompt_tokens=64, max_tokens=16, default_max_tokens=8, max_n=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(sampler, tokenizer) of a tiny random model, shared by every server of this module."""
    srv = serve_model_dir(
        make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_load"))),
        config=ServerConfig(port=0, limits=LIMITS),
        compute_dtype=jnp.float32,
    )
    srv.shutdown()  # never started: only its sampler and tokenizer are kept
    for rows in (1, 16):  # compile both batch buckets (8, 16) before the clients come
        srv.sampler.generate([[5, 6, 7]] * rows, SamplingParams(temperature=0, max_new_tokens=8))
    return srv.sampler, srv.tokenizer


def _hundred_clients(url):
    """Run 100 concurrent clients (default retries) once each; return the failures."""
    failures, texts = [], {}
    ready = threading.Barrier(100)

    def one(i):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120)
        ready.wait(120)  # all 100 at once
        try:
            r = client.chat.completions.create(
                model="advgame",
                max_tokens=8,
                temperature=0,
                messages=[{"role": "user", "content": f"steps {i % 7}"}],
            )
            texts[i] = r.choices[0].message.content
        except openai.OpenAIError as err:
            failures.append(f"{i}: {type(err).__name__}: {err}")
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return failures, texts


class _Paced:
    """The real sampler, each batch taking at least ``seconds`` (a larger model's pace), so
    100 clients arriving together overflow a queue of 16 however fast this machine is."""

    def __init__(self, sampler, seconds):
        self.sampler, self.seconds = sampler, seconds

    def generate_many(self, requests):
        t0 = time.monotonic()
        out = self.sampler.generate_many(requests)
        time.sleep(max(0.0, self.seconds - (time.monotonic() - t0)))
        return out


@pytest.mark.parametrize("queue_size", [128, 16])
def test_hundred_concurrent_openai_clients(tiny, queue_size):
    sampler, tok = tiny
    if queue_size < 100:
        sampler = _Paced(sampler, 0.3)
    config = ServerConfig(port=0, queue_size=queue_size, limits=LIMITS)
    with OpenAIServer(sampler, tok, config) as srv:
        failures, texts = _hundred_clients(srv.url)
    assert failures == []
    assert len(texts) == 100
    # Greedy: the same prompt got the same answer whichever batch served it.
    assert all(texts[i] == texts[i % 7] for i in range(100))
    if queue_size >= 100:
        assert srv.rejected == 0
    else:  # the overflow was told to come back (Retry-After) and came back successfully
        assert srv.rejected > 0


def test_streamed_chat_equals_the_greedy_answer(tiny):
    sampler, tok = tiny
    with OpenAIServer(sampler, tok, ServerConfig(port=0, limits=LIMITS)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        ask = dict(
            model="advgame",
            max_tokens=12,
            temperature=0,
            logprobs=True,
            messages=[{"role": "user", "content": "first then steps"}],
        )
        whole = client.chat.completions.create(**ask)
        chunks = list(
            client.chat.completions.create(
                **ask, stream=True, stream_options={"include_usage": True}
            )
        )
    choice = whole.choices[0]
    streamed = [c for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == choice.message.content
    tokens = [e for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in tokens] == [
        (e.token, e.logprob) for e in choice.logprobs.content
    ]
    assert streamed[-1].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
