"""The game losses vs an independent numpy transcription of GAME_SPEC §2.11 and hand values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advgame_jax import losses

P, T = 7, 11


def _np_seq(lp, mask, length_normalization):
    total = np.where(mask, lp, 0.0).sum(axis=1)
    if length_normalization:
        total = total / np.maximum(mask.sum(axis=1), 1)
    return total


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _random_batch(seed=0):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(size=(4, P, T)).astype(np.float32)  # pi_c, pi_r, ref_c, ref_r
    mask = rng.random((P, T)) > 0.3
    mask[0] = False  # an item without completion tokens
    mask[1] = True
    return lp, mask


@pytest.mark.parametrize("length_normalization", [False, True])
def test_sequence_logprobs_nll_entropy_match_numpy(length_normalization):
    lp, mask = _random_batch()
    tok = lp[0].copy()
    tok[~mask] = np.nan  # masked positions must not leak
    kw = dict(length_normalization=length_normalization)
    want = _np_seq(lp[0], mask, length_normalization)
    got = losses.sequence_logprobs(jnp.asarray(tok), jnp.asarray(mask), **kw)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    got = losses.nll_loss(jnp.asarray(tok), jnp.asarray(mask), **kw)
    np.testing.assert_allclose(np.asarray(got), -want, rtol=1e-6, atol=1e-6)
    ent = -lp[1]
    got = losses.entropy_bonus(jnp.asarray(ent), jnp.asarray(mask), **kw)
    np.testing.assert_allclose(np.asarray(got), _np_seq(ent, mask, length_normalization), 1e-6)
    grad = jax.grad(lambda x: losses.nll_loss(x, jnp.asarray(mask), **kw).sum())(jnp.asarray(tok))
    denom = np.maximum(mask.sum(1, keepdims=True), 1) if length_normalization else 1.0
    np.testing.assert_allclose(np.asarray(grad), np.where(mask, -1.0 / denom, 0.0), 1e-6)


@pytest.mark.parametrize("length_normalization", [False, True])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_and_ipo_match_numpy(beta, length_normalization):
    lp, mask = _random_batch(seed=1)
    seq = [
        losses.sequence_logprobs(
            jnp.asarray(x), jnp.asarray(mask), length_normalization=length_normalization
        )
        for x in lp
    ]
    np_seq = [_np_seq(x, mask, length_normalization) for x in lp]
    margin = (np_seq[0] - np_seq[2]) - (np_seq[1] - np_seq[3])
    np.testing.assert_allclose(
        np.asarray(losses.dpo_loss(*seq, beta=beta)),
        -_np_log_sigmoid(beta * margin),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(losses.ipo_loss(*seq, beta=beta)),
        (margin - 1.0 / (2.0 * beta)) ** 2,
        rtol=1e-5,
        atol=1e-5,
    )


def test_dpo_ipo_hand_values():
    # Δc − Δr = (1.5 − 0.5) − (−1.0 − 0.0) = 2.
    args = [jnp.array([1.5]), jnp.array([-1.0]), jnp.array([0.5]), jnp.array([0.0])]
    np.testing.assert_allclose(float(losses.dpo_loss(*args, beta=0.1)[0]), 0.5981388693, 1e-6)
    np.testing.assert_allclose(float(losses.ipo_loss(*args, beta=0.1)[0]), 9.0, 1e-6)
    np.testing.assert_allclose(float(losses.ipo_loss(*args, beta=0.5)[0]), 1.0, 1e-6)
    # Equal margins: DPO = log 2.
    zero = [jnp.zeros(1)] * 4
    np.testing.assert_allclose(float(losses.dpo_loss(*zero, beta=0.1)[0]), 0.6931471806, 1e-6)


def test_dpo_is_stable_for_huge_margins_and_reference_gets_no_gradient():
    pc, pr = jnp.array([3e4, -3e4]), jnp.zeros(2)
    loss = losses.dpo_loss(pc, pr, jnp.zeros(2), jnp.zeros(2), beta=0.1)
    np.testing.assert_allclose(np.asarray(loss), [0.0, 3000.0], rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda r: losses.dpo_loss(pc, pr, r, r, beta=0.1).sum())(jnp.ones(2))
    np.testing.assert_array_equal(np.asarray(g), [0.0, 0.0])
    g = jax.grad(lambda c: losses.dpo_loss(c, pr, jnp.zeros(2), jnp.zeros(2), beta=0.1).sum())(pc)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(g), [0.0, -0.1], atol=1e-6)


def _np_grpo(lp, ref, adv, mask, kl_coef, sampler, tis_cap):
    """Value and d value / d lp of the GRPO sample loss, straight from the spec formulas."""
    w = np.ones_like(lp) if sampler is None else np.minimum(np.exp(lp - sampler), tis_cap)
    k3 = np.exp(ref - lp) - (ref - lp) - 1.0
    per_token = -w * adv[:, None] + kl_coef * k3
    value = np.where(mask, per_token, 0.0).sum(axis=1)
    grad = np.where(mask, -w * adv[:, None] + kl_coef * (1.0 - np.exp(ref - lp)), 0.0)
    return value, grad


@pytest.mark.parametrize("with_sampler", [False, True])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_grpo_value_and_gradient_match_numpy(with_sampler, kl_coef):
    rng = np.random.default_rng(3)
    lp = -rng.exponential(size=(P, T))
    ref = lp + rng.normal(scale=0.5, size=(P, T))
    sampler = lp + rng.normal(scale=1.0, size=(P, T)) if with_sampler else None
    adv = rng.normal(size=P)
    _, mask = _random_batch(seed=3)
    want_value, want_grad = _np_grpo(lp, ref, adv, mask, kl_coef, sampler, 2.0)
    if with_sampler:
        assert np.any(np.exp(lp - sampler)[mask] > 2.0)  # the cap is exercised

    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731

    def total(x):
        return losses.grpo_loss(
            x,
            f32(ref),
            f32(adv),
            jnp.asarray(mask),
            kl_coef=kl_coef,
            importance=None if sampler is None else losses.ImportanceWeighting(f32(sampler)),
        )

    np.testing.assert_allclose(np.asarray(total(f32(lp))), want_value, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda x: total(x).sum())(f32(lp))
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-5)


def test_grpo_masked_garbage_does_not_leak():
    lp = jnp.array([[-1.0, jnp.nan, -jnp.inf, 80.0]])
    mask = jnp.array([[True, False, False, False]])
    ref = jnp.array([[-1.5, jnp.inf, 0.0, -90.0]])
    sampler = jnp.array([[-2.0, -jnp.inf, jnp.nan, 0.0]])
    fn = lambda x: losses.grpo_loss(  # noqa: E731
        x, ref, jnp.array([2.0]), mask, kl_coef=0.1, importance=losses.ImportanceWeighting(sampler)
    ).sum()
    value, grad = jax.value_and_grad(fn)(lp)
    # w = min(e^1, 2) = 2; k3 = e^-0.5 + 0.5 - 1.
    np.testing.assert_allclose(float(value), -4.0 + 0.1 * (np.exp(-0.5) - 0.5), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(grad), [[-4.0 + 0.1 * (1 - np.exp(-0.5)), 0.0, 0.0, 0.0]], rtol=1e-6
    )


def test_normalised_sum_uses_the_global_count():
    rng = np.random.default_rng(4)
    per_item = rng.normal(size=(3, 5)).astype(np.float32)  # 3 microbatches of 5 items
    valid = rng.random((3, 5)) > 0.4
    per_item[~valid] = np.inf  # padded items may hold anything
    count = int(valid.sum())
    got = sum(
        float(losses.normalised_sum(jnp.asarray(x), jnp.asarray(v), count))
        for x, v in zip(per_item, valid)
    )
    np.testing.assert_allclose(got, per_item[valid].mean(), rtol=1e-5)


@pytest.mark.parametrize("loss_fn", [losses.dpo_loss, losses.ipo_loss])
def test_zero_valid_pairs_give_zero_loss_and_finite_gradients(loss_fn):
    # A batch of padding pairs: empty completion masks, garbage token log-probs.
    mask = jnp.zeros((3, T), bool)
    garbage = jnp.full((3, T), jnp.nan).at[1].set(-jnp.inf)

    def total(token_logps):
        seq = losses.sequence_logprobs(token_logps, mask)
        per_pair = loss_fn(seq, seq, jnp.zeros(3), jnp.zeros(3), beta=0.1)
        return losses.normalised_sum(per_pair, jnp.zeros(3, bool), jnp.int32(0))

    value, grad = jax.value_and_grad(total)(garbage)
    assert float(value) == 0.0
    np.testing.assert_array_equal(np.asarray(grad), np.zeros((3, T)))
