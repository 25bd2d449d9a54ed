"""The CPU decode specialisations against the plain program: a decode loop in phases over a
growing cache (``decode_windows``, ``grow_cache``) gives the one-loop program's tokens and
log-probs, a sampler that keeps the split decode weights across calls gives the per-call
split's outputs, before and after ``load_weights``, and a one-device mesh takes the same
one-device program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advgame_jax.models import init_cache, load_hf, make_mesh
from advgame_jax.models.kv_cache import grow_cache
from advgame_jax.sampling import InMemoryWeights, SamplingParams
from advgame_jax.sampling.decode import (
    MIN_PHASE_STEPS,
    DecodeBatch,
    DecodeProgram,
    decode_windows,
    generate_tokens,
)
from advgame_jax.sampling.jax_sampler import DECODE_PHASES, JaxSampler
from tests.tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("phases")
    make_tiny_llama(root / "a", seed=0)
    make_tiny_llama(root / "b", seed=1)
    return load_hf(root / "a"), load_hf(root / "b")[1]


@pytest.mark.parametrize("prompt_len,n_max,phases", [(64, 256, 4), (16, 100, 4), (8, 16, 4)])
def test_decode_windows_cover_every_step(prompt_len, n_max, phases):
    windows = decode_windows(prompt_len, n_max, phases)
    assert 1 <= len(windows) <= phases
    assert windows[-1] == (n_max, prompt_len + n_max)  # the last phase is the full cache
    start = 1  # step 0 is the prefill's token
    for end, slots in windows:
        assert end > start - 1 and slots == prompt_len + end
        assert all(prompt_len + t - 1 < slots for t in range(start, end))
        start = end
    lengths = np.diff([0] + [e for e, _ in windows])[:-1]
    assert all(n >= MIN_PHASE_STEPS and n % 16 == 0 for n in lengths)
    assert decode_windows(64, 256, 4) == [(64, 128), (128, 192), (192, 256), (256, 320)]
    assert decode_windows(64, 256, 1) == [(256, 320)]


def test_grow_cache_keeps_the_written_slots(tiny):
    (config, _), _ = tiny
    rng = np.random.default_rng(0)
    cache = init_cache(config, 2, 5, dtype=jnp.float32)
    cache = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), cache)
    mask = rng.random((2, 5)) < 0.5
    grown, grown_mask = grow_cache(cache, mask, 9)
    assert grown.max_len == 9 and grown_mask.shape == (2, 9)
    np.testing.assert_array_equal(np.asarray(grown.k)[:, :, :, :5], np.asarray(cache.k))
    np.testing.assert_array_equal(np.asarray(grown.v)[:, :, :, :5], np.asarray(cache.v))
    assert not np.asarray(grown.k)[:, :, :, 5:].any() and not np.asarray(grown.v)[:, :, :, 5:].any()
    np.testing.assert_array_equal(np.asarray(grown_mask), np.pad(mask, ((0, 0), (0, 4))))
    with pytest.raises(ValueError, match="slots"):
        grow_cache(cache, mask, 4)


def _batch(vocab, n_max):
    """Four left-padded rows: greedy and sampled, different budgets, one stop id."""
    rng = np.random.default_rng(1)
    lens, p = (3, 9, 14, 6), 16
    tokens = np.zeros((4, p), np.int32)
    mask = np.zeros((4, p), bool)
    for r, n in enumerate(lens):
        tokens[r, p - n :] = rng.integers(3, vocab, n)
        mask[r, p - n :] = True
    stop = np.full((4, 4), -1, np.int32)
    stop[3, 0] = 7
    return DecodeBatch(
        tokens,
        mask,
        np.array([0.0, 0.0, 1.0, 0.8], np.float32),
        np.ones(4, np.float32),
        np.zeros(4, np.int32),
        np.array([n_max, 70, n_max, n_max], np.int32),
        stop,
        np.arange(16, dtype=np.uint32).reshape(4, 4),
    )


@pytest.mark.parametrize("split", [False, True])
def test_phased_decode_equals_one_loop(tiny, split):
    (config, params), _ = tiny
    n_max = 128
    batch = _batch(config.vocab_size, n_max)
    outs = []
    for phases in (1, 4):
        program = DecodeProgram(config, n_max, "float32", "float32", False, split, phases)
        run = jax.jit(generate_tokens, static_argnums=2)
        outs.append(jax.device_get(run(params, batch, program)))
    one, phased = outs
    assert len(decode_windows(16, n_max, 4)) == 4
    np.testing.assert_array_equal(phased.num_tokens, one.num_tokens)
    np.testing.assert_array_equal(phased.stopped, one.stopped)
    np.testing.assert_array_equal(phased.tokens, one.tokens)
    np.testing.assert_allclose(phased.logprobs, one.logprobs, atol=1e-5, rtol=0)
    assert one.num_tokens[1] == 70  # a row's own budget ends it inside a phase


def test_kept_decode_weights_equal_a_per_call_split(tiny):
    (config, params), params_b = tiny
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(3, config.vocab_size, n)] for n in (3, 9, 14)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=40)
    kept = JaxSampler(config, params, compute_dtype="float32")
    fresh = JaxSampler(config, params, compute_dtype="float32", keep_decode_weights=False)
    assert kept.keep_decode_weights == (jax.default_backend() == "cpu")
    assert not fresh.keep_decode_weights
    ids = lambda s: [c.token_ids for c in s.generate(prompts, sp)]  # noqa: E731
    first = ids(kept)
    assert first == ids(fresh)
    assert ids(kept) == first  # the kept copy serves the next call
    kept.load_weights(InMemoryWeights(params_b, version=1))
    assert kept._decode_params is None  # dropped with the old weights
    fresh.load_weights(InMemoryWeights(params_b, version=1))
    after = ids(kept)
    assert after == ids(fresh) and after != first
    kept.close()
    assert kept._decode_params is None


def test_a_one_device_mesh_takes_the_one_device_program(tiny):
    (config, params), _ = tiny
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, config.vocab_size, n)] for n in (4, 11)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=40)
    plain = JaxSampler(config, params, compute_dtype="float32")
    meshed = JaxSampler(config, params, compute_dtype="float32", mesh=make_mesh())
    on_cpu = jax.default_backend() == "cpu"
    assert meshed.decode_phases == plain.decode_phases == (DECODE_PHASES if on_cpu else 1)
    assert meshed.keep_decode_weights == plain.keep_decode_weights == on_cpu
    got = [c.token_ids for c in meshed.generate(prompts, sp)]
    assert got == [c.token_ids for c in plain.generate(prompts, sp)]
