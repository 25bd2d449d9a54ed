"""Forward-pass parity against transformers' torch Llama-3 / Qwen2 on tiny random checkpoints.

Measured (random batches below, non-padded positions, logits std ≈ 1.3), CPU jax 0.10.2 and
H200 GPU jax 0.11.2:
  fp32 params + fp32 compute vs torch fp32: max |Δlogit| ≈ 4e-6–7e-6 (Llama), 5e-6 (Qwen2)
  on CPU, 5e-6 on GPU; bound asserted 1e-4.
  bf16 params + bf16 compute vs torch fp32: max |Δlogit| ≈ 0.128 (Llama), 0.117 (Qwen2) on
  CPU, 0.125 / 0.125 on GPU; bound asserted 0.25 (bf16 rounding of weights and activations
  through 2 layers).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from advgame_jax.models import (
    ModelConfig,
    forward,
    forward_hidden,
    init_params,
    load_hf,
    param_logical_axes,
    param_shapes,
    unembedding,
)
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2

B, T = 4, 14


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    maker = make_tiny_llama if request.param == "llama" else make_tiny_qwen2
    return maker(path), path


def _batch(seed=0, vocab=256):
    """Row 0 full, rows 1-2 left-padded (3 and 6 pads), row 3 right-padded (5 pads)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = 0
    mask[2, :6] = 0
    mask[3, T - 5 :] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return tokens, mask, positions


def _torch_logits(model, tokens, mask, positions):
    with torch.no_grad():
        return (
            model(
                input_ids=torch.tensor(tokens),
                attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions),
            )
            .logits.float()
            .numpy()
        )


def test_fp32_parity_left_and_right_padding(tiny):
    model, path = tiny
    config, params = load_hf(path)
    tokens, mask, positions = _batch()
    ref = _torch_logits(model, tokens, mask, positions)
    out = np.asarray(jax.jit(forward, static_argnums=1)(params, config, tokens, mask))
    assert out.dtype == np.float32 and out.shape == (B, T, config.vocab_size)
    real = mask.astype(bool)
    assert ref[real].std() > 0.5  # the random init gives non-trivial logits
    np.testing.assert_array_less(np.abs(out - ref)[real].max(), 1e-4)
    # explicit positions equal the default ones
    out2 = np.asarray(forward(params, config, tokens, mask, positions))
    np.testing.assert_allclose(out2[real], out[real], atol=1e-6)


def test_bf16_parity_bound(tiny):
    model, path = tiny
    config, params = load_hf(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    tokens, mask, positions = _batch(seed=1)
    ref = _torch_logits(model, tokens, mask, positions)
    out = forward(params, config, tokens, mask, compute_dtype=jnp.bfloat16)
    assert out.dtype == jnp.float32
    diff = np.abs(np.asarray(out) - ref)[mask.astype(bool)].max()
    assert 0 < diff < 0.25, diff
    hidden = forward_hidden(params, config, tokens, mask, compute_dtype=jnp.bfloat16)
    assert hidden.dtype == jnp.bfloat16


def test_hidden_times_unembedding_is_logits(tiny):
    model, path = tiny
    config, params = load_hf(path)
    tokens, mask, _ = _batch(seed=2)
    logits = forward(params, config, tokens, mask)
    hidden = forward_hidden(params, config, tokens, mask)
    w = unembedding(params, config)
    assert hidden.shape == (B, T, config.hidden_size) and w.shape == (
        config.hidden_size,
        config.vocab_size,
    )
    np.testing.assert_allclose(np.asarray(hidden @ w), np.asarray(logits), atol=1e-5)
    # lm_head of the torch model is the unembedding (tied: the embedding itself)
    np.testing.assert_allclose(np.asarray(w).T, model.lm_head.weight.detach().numpy())


def test_remat_gives_same_gradients():
    config = ModelConfig(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    params = init_params(config, jax.random.key(1), std=0.2)
    tokens, mask, _ = _batch(seed=2, vocab=64)

    @functools.partial(jax.jit, static_argnums=1)
    def grad(p, remat):
        return jax.grad(lambda q: forward(q, config, tokens, mask, remat=remat).std())(p)

    g0, g1 = grad(params, False), grad(params, True)
    assert np.abs(np.asarray(g0["layers"]["q_proj"])).max() > 1e-4
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_default_mask_is_all_ones(tiny):
    model, path = tiny
    config, params = load_hf(path)
    tokens, _, _ = _batch(seed=3)
    full = np.ones_like(tokens)
    ref = _torch_logits(model, tokens, full, np.broadcast_to(np.arange(T), tokens.shape))
    np.testing.assert_allclose(np.asarray(forward(params, config, tokens)), ref, atol=1e-4)


def test_llama3_rope_scaling_changes_frequencies(tmp_path):
    model = make_tiny_llama(tmp_path)
    config = ModelConfig.from_hf_file(tmp_path)
    plain = dataclasses.replace(config, rope_type=None).rope_inv_freq()
    scaled = config.rope_inv_freq()
    changed = ~np.isclose(scaled, plain, rtol=1e-6)
    assert changed.sum() >= 4 and (~changed).sum() >= 1  # some scaled, some kept
    # some frequencies lie in the smoothed band (neither kept nor divided by the factor)
    smoothed = changed & ~np.isclose(scaled, plain / config.rope_factor, rtol=1e-6)
    assert smoothed.any()
    np.testing.assert_allclose(scaled, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


def test_init_params_matches_shapes_and_axes():
    config = ModelConfig(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        qkv_bias=True,
    )
    params = init_params(config, jax.random.key(0), dtype=jnp.bfloat16)
    shapes = param_shapes(config, jnp.bfloat16)
    axes = param_logical_axes(config)
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    for p, s, a in zip(
        jax.tree.leaves(params),
        jax.tree.leaves(shapes),
        jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
    ):
        assert p.shape == s.shape and p.dtype == jnp.bfloat16 and len(a) == p.ndim
    assert params["layers"]["q_proj"].shape == (3, 32, 4, 8)
    assert "lm_head" not in params
    logits = jax.jit(forward, static_argnums=1)(params, config, jnp.zeros((2, 5), jnp.int32))
    assert logits.shape == (2, 5, 64) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_config_is_hashable_and_round_trips(tiny):
    _, path = tiny
    config = ModelConfig.from_hf_file(path)
    assert hash(config) == hash(ModelConfig.from_hf_file(path))
    again = ModelConfig.from_hf_dict(config.to_hf_dict())
    assert again == config
