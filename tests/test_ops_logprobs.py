"""Tiled per-token log-probs / entropies vs float64 numpy and autodiff of the naive reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advgame_jax.ops import (
    naive_token_logprobs,
    naive_token_logprobs_and_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)
from advgame_jax.ops.logprobs import tiled_token_logprobs_and_entropy

N, D, V = 203, 24, 300
# (rows, vocabulary columns) per tile: ragged rows and a ragged vocabulary tail, an exact
# split, one row chunk over several blocks, and the default vocabulary block (>= V).
TILES = [(64, 128), (29, 100), (512, 64), (16, None)]


def _tiled(chunk, vocab_chunk, with_entropy=True):
    def fn(h, w, t):
        if vocab_chunk is None:
            return token_logprobs_and_entropy(h, w, t, chunk_size=chunk)
        return tiled_token_logprobs_and_entropy(
            h, w, t, chunk_size=chunk, vocab_chunk_size=vocab_chunk, with_entropy=with_entropy
        )

    return fn


def _inputs(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, D)).astype(np.float32) * scale
    h[-5:] = 0.0  # padding-like rows
    w = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32) * 3.0
    t = rng.integers(0, V, size=N).astype(np.int32)
    valid = rng.random(N) > 0.2
    valid[-5:] = False
    return h, w, t, valid


def _numpy_reference(h, w, t):
    """Float64 log-probs and entropies straight from the definitions."""
    z = h.astype(np.float64) @ w.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    lp = logp[np.arange(len(t)), t]
    ent = -(np.exp(logp) * logp).sum(axis=1)
    return lp, ent


@pytest.mark.parametrize("chunk,vocab_chunk", TILES)
def test_values_match_float64_numpy(chunk, vocab_chunk):
    h, w, t, _ = _inputs()
    lp, ent = _tiled(chunk, vocab_chunk)(jnp.asarray(h), jnp.asarray(w), jnp.asarray(t))
    lp_ref, ent_ref = _numpy_reference(h, w, t)
    np.testing.assert_allclose(np.asarray(lp), lp_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), ent_ref, rtol=1e-5, atol=1e-5)
    lp_only = token_logprobs(jnp.asarray(h), jnp.asarray(w), jnp.asarray(t), chunk_size=chunk)
    np.testing.assert_allclose(np.asarray(lp_only), lp_ref, rtol=1e-5, atol=1e-5)


def _masked_objective(fn, g_lp, g_ent, with_entropy=True):
    def loss(h, w, t):
        out = fn(h, w, t)
        if with_entropy:
            return jnp.sum(g_lp * out[0]) + jnp.sum(g_ent * out[1])
        return jnp.sum(g_lp * out)

    return jax.grad(loss, argnums=(0, 1))


@pytest.mark.parametrize("chunk,vocab_chunk", TILES)
def test_gradients_match_autodiff_of_naive(chunk, vocab_chunk):
    h, w, t, valid = _inputs(seed=1)
    rng = np.random.default_rng(2)
    # Random cotangents, zero on masked rows (what a loss mask does).
    g_lp = jnp.asarray(np.where(valid, rng.normal(size=N), 0.0).astype(np.float32))
    g_ent = jnp.asarray(np.where(valid, rng.normal(size=N), 0.0).astype(np.float32))
    args = (jnp.asarray(h), jnp.asarray(w), jnp.asarray(t))
    got = _masked_objective(_tiled(chunk, vocab_chunk), g_lp, g_ent)(*args)
    want = _masked_objective(naive_token_logprobs_and_entropy, g_lp, g_ent)(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # Log-prob-only path (no entropy terms in its backward pass).
    got = _masked_objective(
        lambda *a: token_logprobs(*a, chunk_size=chunk), g_lp, None, with_entropy=False
    )(*args)
    want = _masked_objective(naive_token_logprobs, g_lp, None, with_entropy=False)(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_out_of_range_targets_and_large_logits_stay_finite():
    h, w, t, valid = _inputs(seed=3, scale=30.0)  # logits in the hundreds
    t = np.where(valid, t, -100).astype(np.int32)  # ignore-index style padding targets
    g = jnp.asarray(valid.astype(np.float32))
    args = (jnp.asarray(h), jnp.asarray(w), jnp.asarray(t))
    fn = _tiled(32, 64)
    lp, ent = fn(*args)
    grads = _masked_objective(fn, g, g)(*args)
    for x in (lp, ent) + tuple(grads):
        assert np.all(np.isfinite(np.asarray(x)))
    lp_ref, ent_ref = _numpy_reference(h, w, np.where(valid, t, 0))
    np.testing.assert_allclose(np.asarray(lp)[valid], lp_ref[valid], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(ent), ent_ref, rtol=1e-4, atol=1e-4)


def test_bf16_inputs_are_finite_and_close():
    h, w, t, valid = _inputs(seed=4)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    lp, ent = _tiled(64, 128)(hb, wb, jnp.asarray(t))
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
    # fp32 logits of the bf16-rounded inputs: only the summation order differs.
    lp_ref, ent_ref = _numpy_reference(
        np.asarray(hb.astype(jnp.float32)), np.asarray(wb.astype(jnp.float32)), t
    )
    np.testing.assert_allclose(np.asarray(lp), lp_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent), ent_ref, rtol=1e-4, atol=1e-4)
    g = jnp.asarray(valid.astype(np.float32))
    got = _masked_objective(_tiled(64, 128), g, g)(hb, wb, jnp.asarray(t))
    want = _masked_objective(naive_token_logprobs_and_entropy, g, g)(
        hb.astype(jnp.float32), wb.astype(jnp.float32), jnp.asarray(t)
    )
    for a, b in zip(got, want):
        assert a.dtype == jnp.bfloat16
        a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b)
        assert np.all(np.isfinite(a))
        # The logit cotangent enters the gradient matmuls in bf16 (8 mantissa bits).
        assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b))


def test_bad_shapes_raise_one_clear_error():
    h, w, t, _ = _inputs()
    with pytest.raises(ValueError, match="shape mismatch"):
        token_logprobs(jnp.asarray(h), jnp.asarray(w[:-1]), jnp.asarray(t))
    with pytest.raises(ValueError, match="integer token ids"):
        token_logprobs(jnp.asarray(h), jnp.asarray(w), jnp.asarray(t, jnp.float32))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(jnp.asarray(h), jnp.asarray(w), jnp.asarray(t), chunk_size=0)


def _temp_bytes(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        pytest.fail("compiled memory_analysis() returned None on this backend")
    return analysis.temp_size_in_bytes


def test_compiled_temp_memory_is_at_most_a_quarter_of_naive():
    n, d, v = 4096, 128, 32000
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    t = jax.ShapeDtypeStruct((n,), jnp.int32)
    g = jax.ShapeDtypeStruct((n,), jnp.float32)

    def chunked(h, w, t):
        return token_logprobs(h, w, t, chunk_size=512)

    def value_and_grad(fn):
        return jax.value_and_grad(lambda h, w, t, g: jnp.sum(g * fn(h, w, t)), argnums=(0, 1))

    naive_fwd = _temp_bytes(naive_token_logprobs, h, w, t)
    tiled_fwd = _temp_bytes(chunked, h, w, t)
    naive_vg = _temp_bytes(value_and_grad(naive_token_logprobs), h, w, t, g)
    tiled_vg = _temp_bytes(value_and_grad(chunked), h, w, t, g)
    logits_bytes = n * v * 4
    assert naive_fwd >= logits_bytes  # the reference really holds the [N, V] logits
    assert tiled_fwd <= naive_fwd / 4, (tiled_fwd, naive_fwd)
    assert tiled_vg <= naive_vg / 4, (tiled_vg, naive_vg)


@pytest.mark.parametrize("chunk,vocab_chunk", [(64, 128), (29, 100)])
def test_vocab_major_table_gives_the_same_values_and_gradients(chunk, vocab_chunk):
    """A [V, d] table (a tied embedding as stored) with ``vocab_major`` is the kernel on its
    transpose: same log-probs, entropies and gradients (the table's in its own layout)."""
    h, w, t, valid = _inputs(seed=3)
    g = jnp.asarray(valid, jnp.float32)

    def loss(vm):
        def fn(h, w):
            lp, ent = tiled_token_logprobs_and_entropy(
                h,
                w,
                jnp.asarray(t),
                chunk_size=chunk,
                vocab_chunk_size=vocab_chunk,
                vocab_major=vm,
            )
            return jnp.sum(g * lp) + 0.3 * jnp.sum(g * ent)

        return fn

    want, (gh_want, gw_want) = jax.value_and_grad(loss(False), (0, 1))(
        jnp.asarray(h), jnp.asarray(w)
    )
    got, (gh, gw) = jax.value_and_grad(loss(True), (0, 1))(jnp.asarray(h), jnp.asarray(w.T))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gw_want).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        token_logprobs(jnp.asarray(h), jnp.asarray(w), jnp.asarray(t), vocab_major=True)
