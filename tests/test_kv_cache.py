"""KV-cache prefill + greedy decode equals one full forward over the whole sequence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advgame_jax.models import (
    CacheSlots,
    KVCache,
    forward,
    forward_with_cache,
    init_cache,
    load_hf,
)
from advgame_jax.models.kv_cache import split_layers
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2

PROMPT_LENS = (5, 8, 3)
N_DECODE = 6


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    (make_tiny_llama if request.param == "llama" else make_tiny_qwen2)(path)
    return load_hf(path)


def _left_padded_prompts(seed=0):
    rng = np.random.default_rng(seed)
    p = max(PROMPT_LENS)
    tokens = np.zeros((len(PROMPT_LENS), p), np.int32)
    mask = np.zeros((len(PROMPT_LENS), p), bool)
    for b, n in enumerate(PROMPT_LENS):
        tokens[b, p - n :] = rng.integers(1, 256, n)
        mask[b, p - n :] = True
    return tokens, mask


@functools.partial(jax.jit, static_argnums=1, static_argnames="last_only", donate_argnums=4)
def _step(params, config, tokens, positions, cache, cache_index, kv_mask, last_only=False):
    return forward_with_cache(
        params,
        config,
        tokens,
        positions,
        cache,
        CacheSlots(cache_index, kv_mask),
        last_only=last_only,
    )


def test_prefill_then_greedy_decode_equals_full_forward(model):
    config, params = model
    prompts, prompt_mask = _left_padded_prompts()
    b, p = prompts.shape
    max_len = p + N_DECODE + 2  # spare slots stay masked
    cache = init_cache(config, b, max_len, dtype=jnp.float32)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == (config.num_layers, b, config.num_kv_heads, max_len, config.head_dim)
    kv_mask = np.zeros((b, max_len), bool)
    kv_mask[:, :p] = prompt_mask
    positions = np.maximum(np.cumsum(prompt_mask, -1) - 1, 0).astype(np.int32)
    logits, cache = _step(params, config, prompts, positions, cache, jnp.int32(0), kv_mask)
    step_logits = [np.asarray(logits)]
    next_pos = np.asarray(PROMPT_LENS, np.int32)
    seq = [prompts]
    nxt = np.asarray(logits[:, -1].argmax(-1), np.int32)
    for i in range(N_DECODE):
        kv_mask[:, p + i] = True
        seq.append(nxt[:, None])
        logits, cache = _step(
            params,
            config,
            nxt[:, None],
            (next_pos + i)[:, None],
            cache,
            jnp.int32(p + i),
            kv_mask,
            last_only=True,
        )
        assert logits.shape == (b, config.vocab_size) and logits.dtype == jnp.float32
        step_logits.append(np.asarray(logits)[:, None])
        nxt = np.asarray(logits.argmax(-1), np.int32)

    full_tokens = np.concatenate(seq, axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones((b, N_DECODE), bool)], axis=1)
    ref = np.asarray(forward(params, config, full_tokens, full_mask))
    got = np.concatenate(step_logits, axis=1)
    assert got.shape == ref.shape
    np.testing.assert_array_less(np.abs(got - ref)[full_mask].max(), 1e-4)
    # the cache holds exactly the written slots; spare slots untouched
    assert not np.asarray(cache.k[:, :, p + N_DECODE :]).any()


def test_multi_token_chunk_and_bf16_cache(model):
    config, params = model
    prompts, prompt_mask = _left_padded_prompts(seed=1)
    b, p = prompts.shape
    extra = np.random.default_rng(2).integers(1, 256, (b, 3)).astype(np.int32)
    full_tokens = np.concatenate([prompts, extra], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones((b, 3), bool)], axis=1)
    ref = np.asarray(forward(params, config, full_tokens, full_mask))
    positions = np.maximum(np.cumsum(full_mask, -1) - 1, 0).astype(np.int32)
    for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 0.1)):
        cache = init_cache(config, b, p + 3, dtype=dtype)
        kv_mask = np.zeros((b, p + 3), bool)
        kv_mask[:, :p] = prompt_mask
        _, cache = _step(params, config, prompts, positions[:, :p], cache, jnp.int32(0), kv_mask)
        kv_mask[:, p:] = True  # a 3-token chunk written at slot p
        logits, cache = _step(params, config, extra, positions[:, p:], cache, jnp.int32(p), kv_mask)
        assert cache.k.dtype == dtype
        assert np.abs(np.asarray(logits) - ref[:, p:]).max() < tol


def test_split_layers_decode_layout_matches_stacked(model):
    """``split_layers`` (per-layer, transposed and fused weights) gives the stacked path's
    logits and cache, prefill and one decode step."""
    config, params = model
    prompts, prompt_mask = _left_padded_prompts(seed=3)
    b, p = prompts.shape
    split = split_layers(params)
    assert isinstance(split["layers"], tuple) and len(split["layers"]) == config.num_layers
    kv_mask = np.zeros((b, p + 1), bool)
    kv_mask[:, :p] = prompt_mask
    positions = np.maximum(np.cumsum(prompt_mask, -1) - 1, 0).astype(np.int32)
    outs = []
    for pr in (params, split):
        cache = init_cache(config, b, p + 1, dtype=jnp.float32)
        logits, cache = _step(pr, config, prompts, positions, cache, jnp.int32(0), kv_mask)
        mask1 = kv_mask.copy()
        mask1[:, p] = True
        nxt = np.asarray(logits[:, -1].argmax(-1), np.int32)[:, None]
        last, cache = _step(
            pr, config, nxt, positions[:, -1:] + 1, cache, jnp.int32(p), mask1, last_only=True
        )
        outs.append((np.asarray(logits), np.asarray(last), np.asarray(cache.k)))
    for a, c in zip(*outs):
        np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-5)
