"""VllmSampler on a tiny Llama: greedy parity with transformers, live weight refresh from a
committed sync checkpoint without restarting the engine, cross-engine parity with JaxSampler,
finish reasons and seeds. Needs the ``vllm`` extra."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from advgame_jax.models import load_hf
from advgame_jax.sampling import SamplingParams, SyncCheckpoint
from advgame_jax.sampling.jax_sampler import JaxSampler
from advgame_jax.sampling.weight_sync import write_sync_checkpoint
from tests.test_sampling_jax import _hf_greedy, _prompts, _torch_logprobs
from tests.tiny_models import make_tiny_llama

VLLM_MISSING = importlib.util.find_spec("vllm") is None
# Skip only when vllm is absent; an installed but broken vllm fails the tests.
skip_without_vllm = pytest.mark.skipif(
    VLLM_MISSING, reason="vllm is not installed (pip install -e '.[vllm]')"
)
N_NEW = 24


def test_module_imports_without_touching_vllm():
    import sys

    from advgame_jax.sampling import vllm_sampler

    assert hasattr(vllm_sampler, "VllmSampler")
    if VLLM_MISSING:
        assert "vllm" not in sys.modules


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from advgame_jax.sampling.vllm_sampler import VllmSampler

    root = tmp_path_factory.mktemp("vllm")
    model_a = make_tiny_llama(root / "a", seed=0)
    model_b = make_tiny_llama(root / "b", seed=1)
    sampler = VllmSampler(
        str(root / "a"),
        dtype="float32",
        kv_cache_memory_bytes=64 << 20,
        max_model_len=256,
        enforce_eager=True,
    )
    with sampler:
        yield root, model_a, model_b, sampler


@pytest.mark.vllm
@skip_without_vllm
def test_refresh_from_orbax_checkpoint_without_restart(setup):
    root, model_a, model_b, sampler = setup
    prompts = _prompts(model_a.config.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=N_NEW)
    engine = sampler.llm.llm_engine

    before = sampler.generate(prompts, greedy)
    assert [c.token_ids for c in before] == _hf_greedy(model_a, prompts, N_NEW)
    for p, c in zip(prompts, before):
        np.testing.assert_allclose(c.logprobs, _torch_logprobs(model_a, p, c.token_ids), atol=1e-4)

    config, params_a = load_hf(root / "a")
    _, params_b = load_hf(root / "b")
    sync = str(root / "run" / "sync" / "defender")
    path = write_sync_checkpoint(sync, params_b, version=1, role="defender", dtype=jnp.float32)
    assert sampler.load_weights(SyncCheckpoint(path, version=1)) == 1
    after = sampler.generate(prompts, greedy)
    assert sampler.llm.llm_engine is engine  # same running engine
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert [c.token_ids for c in after] == _hf_greedy(model_b, prompts, N_NEW)
    assert {c.weights_version for c in after} == {1}
    jax_out = JaxSampler(config, params_b, compute_dtype=jnp.float32).generate(prompts, greedy)
    assert [c.token_ids for c in after] == [c.token_ids for c in jax_out]
    for v, j in zip(after, jax_out):
        np.testing.assert_allclose(v.logprobs, j.logprobs, atol=1e-4)

    # A checkpoint of another version than the caller expects is refused after loading.
    path = write_sync_checkpoint(sync, params_a, version=2, role="defender", dtype=jnp.float32)
    with pytest.raises(RuntimeError, match="loaded weights version 2.*expected 5"):
        sampler.load_weights(SyncCheckpoint(path, version=5))
    assert sampler.load_weights(SyncCheckpoint(path)) == 2
    again = sampler.generate(prompts, greedy)
    assert [c.token_ids for c in again] == [c.token_ids for c in before]
    assert sampler.llm.llm_engine is engine


@pytest.mark.vllm
@skip_without_vllm
def test_finish_reasons_and_seeds(setup):
    root, model_a, _, sampler = setup
    path = write_sync_checkpoint(
        str(root / "run" / "sync" / "defender"),
        load_hf(root / "a")[1],
        version=3,
        role="defender",
        dtype=jnp.float32,
    )
    sampler.load_weights(SyncCheckpoint(path))
    prompts = _prompts(model_a.config.vocab_size)
    ref = _hf_greedy(model_a, prompts, N_NEW)
    stop = ref[0][4]
    got = sampler.generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=N_NEW, stop_token_ids=(stop,))
    )
    for r, c in zip(ref, got):
        if stop in r:
            assert c.finish_reason == "stop" and c.token_ids == r[: r.index(stop) + 1]
        else:
            assert c.finish_reason == "length" and c.token_ids == r
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) == 5

    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=8, n=3, seed=5)
    a, b = sampler.generate(prompts, sp), sampler.generate(prompts, sp)
    assert len(a) == len(prompts) * 3
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    other = sampler.generate(
        prompts, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=8, n=3, seed=6)
    )
    assert [c.token_ids for c in other] != [c.token_ids for c in a]


@pytest.mark.vllm
@skip_without_vllm
def test_over_budget_prompt_is_an_empty_length_completion(setup):
    _, model_a, _, sampler = setup
    prompts = _prompts(model_a.config.vocab_size)
    long = prompts[0] * (sampler.max_model_len // len(prompts[0]) + 1)
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = sampler.stats()["prompt_too_long"]
    got = sampler.generate([prompts[0], long, prompts[1]], sp)
    assert sampler.stats()["prompt_too_long"] == before + 1
    assert got[1].token_ids == () and got[1].finish_reason == "length"
    alone = sampler.generate([prompts[0], prompts[1]], sp)
    assert [c.token_ids for c in (got[0], got[2])] == [c.token_ids for c in alone]
