"""Optimizer (AdamW + clipping + warm-up/cosine schedule), EMA and player-state helpers,
checked against numpy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advgame_jax.training import (
    current_lr,
    ema_step,
    ema_update,
    init_player_state,
    make_lr_schedule,
    make_optimizer,
    reference_params,
    sampling_params,
)


def _np_lr(count, lr, num_steps, final, warmup):
    if count < warmup:
        return lr * (count + 1) / warmup
    progress = min(max((count - warmup) / (num_steps - warmup), 0.0), 1.0)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_schedule_warmup_then_cosine_to_final_fraction():
    sched = make_lr_schedule(1e-3, num_steps=10, final_lr_fraction=0.2, warmup_steps=3)
    for count in range(14):
        assert float(sched(count)) == pytest.approx(_np_lr(count, 1e-3, 10, 0.2, 3), rel=1e-6)
    assert float(sched(10)) == pytest.approx(2e-4, rel=1e-6)
    assert float(make_lr_schedule(1e-6, num_steps=5)(0)) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_lr_schedule(1e-3, num_steps=5, warmup_steps=5)


def test_adamw_matches_numpy_over_three_steps():
    params = {
        "w": jnp.asarray(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)),
        "attn_norm": jnp.ones((2, 4), jnp.float32),
    }
    rng = np.random.default_rng(0)
    grads = [
        {
            "w": rng.normal(size=(3, 4)).astype(np.float32) * s,
            "attn_norm": rng.normal(size=(2, 4)).astype(np.float32) * s,
        }
        for s in (3.0, 0.1, 1.0)
    ]
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.95, 1e-8
    tx = make_optimizer(lr, num_steps=4, weight_decay=wd, warmup_steps=1)
    state = tx.init(params)
    p = params
    ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in ref.items()}
    nu = {k: np.zeros_like(v) for k, v in ref.items()}
    for t, g in enumerate(grads, start=1):
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        norm = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in g.values()))
        scale = min(1.0, 1.0 / norm)
        lr_t = _np_lr(t - 1, lr, 4, 0.2, 1)
        assert float(current_lr(state)) == pytest.approx(lr_t, rel=1e-6)
        for k in ref:
            gk = np.asarray(g[k], np.float64) * scale
            mu[k] = b1 * mu[k] + (1 - b1) * gk
            nu[k] = b2 * nu[k] + (1 - b2) * gk * gk
            m_hat, v_hat = mu[k] / (1 - b1**t), nu[k] / (1 - b2**t)
            decay = 0.0 if k.endswith("_norm") else wd  # norms are not decayed
            ref[k] = ref[k] - lr_t * (m_hat / (np.sqrt(v_hat) + eps) + decay * ref[k])
    for k in ref:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-7)


def test_ema_update_and_donated_step_match_numpy():
    params = {
        "a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
        "b": jnp.ones((4,), jnp.bfloat16),
    }
    ema = {"a": jnp.zeros((2, 3), jnp.float32), "b": jnp.zeros((4,), jnp.bfloat16)}
    out = ema_update(ema, params, 0.9)
    np.testing.assert_allclose(np.asarray(out["a"]), 0.1 * np.arange(6).reshape(2, 3), rtol=1e-6)
    assert out["b"].dtype == jnp.bfloat16

    tx = make_optimizer(1e-3, num_steps=3)
    state = init_player_state({"w": jnp.full((3,), 2.0)}, tx)
    state = state.replace(params={"w": jnp.full((3,), 4.0)})
    old_ema = state.ema_params["w"]
    state = ema_step(state, 0.75)
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), 0.75 * 2.0 + 0.25 * 4.0)
    assert old_ema.is_deleted()  # updated in place
    state = ema_step(state, 0.5)  # a new decay is data, not a new program
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), 0.5 * 2.5 + 0.5 * 4.0)


def test_player_state_variants():
    tx = make_optimizer(1e-3, num_steps=3)
    p = lambda: {"w": jnp.ones((2,))}  # noqa: E731
    md = init_player_state(p(), tx, reference="ema")
    assert md.ref_params is None and reference_params(md) is md.ema_params
    assert (
        sampling_params(md, "ema") is md.ema_params and sampling_params(md, "trained") is md.params
    )
    onp = init_player_state(p(), tx, reference="initial")
    assert reference_params(onp) is onp.ref_params and onp.ema_params is not None
    assert onp.ref_params["w"] is not onp.params["w"]  # a real copy, safe from donation
    grpo = init_player_state(p(), tx, reference="initial", keep_ema=False)
    assert grpo.ema_params is None and sampling_params(grpo, "ema") is grpo.params
    frozen = init_player_state(p(), trainable=False)
    assert not frozen.trainable and reference_params(frozen) is frozen.params
    with pytest.raises(ValueError, match="train.reference"):
        init_player_state(p(), tx, reference="sft")
    with pytest.raises(ValueError, match="keep_ema"):
        init_player_state(p(), tx, reference="ema", keep_ema=False)
    with pytest.raises(ValueError, match="train.sample_from"):
        sampling_params(md, "initial")
    assert jax.tree.leaves(frozen) == [frozen.params["w"], frozen.step]
