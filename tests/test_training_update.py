"""The update step: one DPO update against an independent reference (full-logit loss,
jax.grad, numpy AdamW); mesh and microbatch invariance; empty batches; no recompiles inside a
bucket; margins grow and the EMA reference follows θ̄ ← dθ̄ + (1−d)θ; IPO / GRPO directions;
frozen players."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advgame_jax.experiment import compile_counter
from advgame_jax.models import forward, make_mesh
from advgame_jax.training import (
    collate_pairs,
    collate_samples,
    ema_step,
    init_player_state,
    shard_state,
)
from tests import test_training_support as sup

BETA = 0.1


def _state(params=None, reference="ema"):
    params = sup.init() if params is None else params
    return init_player_state(params, sup.optimizer(), reference=reference)


def _batch(pairs, m=1, dp=1):
    return collate_pairs(
        pairs, pad_id=sup.PAD, num_microbatches=m, data_parallel_size=dp, **sup.BUCKETS
    )


def _reference_dpo(params, ref_params, pairs):
    """Mean DPO loss over pairs from full logits of right-padded rows (causal attention alone
    keeps real tokens blind to the padding after them)."""
    rows, picks = [], []
    for i, p in enumerate(pairs):
        for j, comp in enumerate((p.chosen_ids, p.rejected_ids)):
            seq = list(p.prompt_ids) + list(comp)
            rows.append(seq + [sup.PAD] * (16 - len(seq)))
            for k, tok in enumerate(comp):
                picks.append((2 * i + j, len(p.prompt_ids) + k - 1, tok))
    tokens = jnp.asarray(np.array(rows, np.int32))
    r_idx, t_idx, v_idx = (np.array(x) for x in zip(*picks))
    seg = jnp.asarray(r_idx)

    def seq_lp(prm):
        logits = forward(prm, sup.CFG, tokens, compute_dtype=jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)[r_idx, t_idx, v_idx]
        return jax.ops.segment_sum(logp, seg, num_segments=2 * len(pairs)).reshape(-1, 2)

    def loss(prm):
        pi, ref = seq_lp(prm), jax.lax.stop_gradient(seq_lp(ref_params))
        margin = (pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1])
        return jnp.mean(-jax.nn.log_sigmoid(BETA * margin)), margin

    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.fixture(scope="module")
def one_step_reference():
    """(initial params, new params, metrics) of one single-device update on 6 fixed pairs."""
    pairs = sup.fixed_pairs()
    p0 = sup.host(sup.init())
    state, metrics = sup.update_step()(_state(), _batch(pairs))
    return pairs, p0, sup.host(state.params), {k: float(v) for k, v in metrics.items()}, state


def test_one_update_matches_full_logit_loss_and_numpy_adamw(one_step_reference):
    pairs, p0, p1, metrics, state = one_step_reference
    (loss, margin), grads = _reference_dpo(p0, p0, pairs)
    want = sup.numpy_adamw(p0, sup.host(grads), lr=sup.LR)
    # AdamW's first step is lr·g/(|g|+eps): where |g| is within rounding noise of eps, a
    # last-bit difference between two fp32 gradient computations moves the step by up to
    # lr·δg·eps/(|g|+eps)², so those entries are compared only against the step's bound.
    for got, ref, g in zip(
        jax.tree.leaves(p1), jax.tree.leaves(want), jax.tree.leaves(sup.host(grads))
    ):
        diff = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
        stable = np.abs(np.asarray(g, np.float64)) >= 1e-6
        assert np.max(diff[stable], initial=0.0) < 1e-6
        assert np.max(diff[~stable], initial=0.0) <= 2 * sup.LR
    assert metrics["loss"] == pytest.approx(float(loss), abs=1e-6)
    assert metrics["num_pairs"] == 6.0 and metrics["applied"] == 1.0
    assert metrics["lr"] == pytest.approx(sup.LR, rel=1e-6)
    grad_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    assert metrics["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-6)  # θ̄ = θ at the first step
    assert int(state.step) == 1


def test_mesh_and_microbatches_match_single_device(one_step_reference):
    pairs, _, p1, metrics, _ = one_step_reference
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    up = sup.update_step("dpo", 2, (2, 2, 2))
    assert up.data_parallel_size == 4
    state = shard_state(_state(), sup.CFG, mesh)
    state, m_mesh = up(state, _batch(pairs, m=2, dp=4))
    assert sup.max_abs_diff(sup.host(state.params), p1) <= 1e-5
    q = state.params["layers"]["q_proj"]
    want = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    )
    assert q.sharding.is_equivalent_to(want, q.ndim)
    assert float(m_mesh["loss"]) == pytest.approx(metrics["loss"], abs=1e-6)

    state4, m4 = sup.update_step("dpo", 4)(_state(), _batch(pairs, m=4))
    assert sup.max_abs_diff(sup.host(state4.params), p1) <= 1e-5
    for k in ("loss", "margin", "accuracy", "num_pairs", "grad_norm"):
        assert float(m4[k]) == pytest.approx(metrics[k], abs=1e-5), k


def test_bf16_compute_keeps_fp32_master_params(one_step_reference):
    pairs, p0, p1, metrics, _ = one_step_reference
    up = sup.update_step("dpo", 1, None, sup.LR, 0.1, jnp.bfloat16, True)
    state, m = up(_state(), _batch(pairs))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert float(m["loss"]) == pytest.approx(metrics["loss"], abs=1e-3)
    assert float(m["grad_norm"]) == pytest.approx(metrics["grad_norm"], rel=0.1)
    # Same update direction as fp32 on (almost) every coordinate that moved.
    moved = [
        np.sign(np.asarray(a) - b) == np.sign(c - b)
        for a, b, c in zip(jax.tree.leaves(state.params), jax.tree.leaves(p0), jax.tree.leaves(p1))
    ]
    agree = np.mean(np.concatenate([m_.ravel() for m_ in moved]))
    assert agree > 0.9, agree


def test_zero_valid_pairs_changes_nothing():
    up = sup.update_step()
    state, _ = up(_state(), _batch(sup.fixed_pairs()))  # a real step so Adam moments are non-zero
    before = sup.host(state)
    state, metrics = up(state, _batch([]))
    assert sup.max_abs_diff(state.params, before.params) == 0.0
    assert sup.max_abs_diff(state.opt_state, before.opt_state) == 0.0
    assert int(state.step) == int(before.step) == 1
    values = {k: float(v) for k, v in metrics.items()}
    assert all(np.isfinite(v) for v in values.values()), values
    assert values["num_pairs"] == 0.0 and values["applied"] == 0.0 and values["loss"] == 0.0


def _empty_step(step_on_empty: bool, mesh_shape=None):
    from advgame_jax.training.update import LossSettings, StepSettings, make_update_step

    return make_update_step(
        sup.CFG,
        sup.optimizer(),
        LossSettings(kind="dpo", beta=0.1),
        StepSettings(compute_dtype=jnp.float32, chunk_size=64, step_on_empty=step_on_empty),
        mesh=make_mesh(*mesh_shape) if mesh_shape else None,
    )


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_empty_batch_on_step_on_empty_is_adamw_on_zero_gradients(mesh_shape):
    """With ``step_on_empty`` an empty batch still moves the optimizer (as the reference does):
    exactly optax's own update with all-zero gradients, on one device and on a mesh; a real
    batch then still trains (the compute branch of the same program)."""
    import optax

    up = _empty_step(True, mesh_shape)
    state = _state()
    if mesh_shape:
        state = shard_state(state, sup.CFG, make_mesh(*mesh_shape))
    state, _ = up(state, _batch(sup.fixed_pairs(), dp=up.data_parallel_size))
    before = sup.host(state)
    zeros = jax.tree.map(np.zeros_like, before.params)
    updates, want_opt = up.optimizer.update(zeros, before.opt_state, before.params)
    want_params = optax.apply_updates(before.params, updates)
    state, metrics = up(state, _batch([], dp=up.data_parallel_size))
    assert sup.max_abs_diff(sup.host(state.params), want_params) <= 1e-7
    assert sup.max_abs_diff(sup.host(state.opt_state), want_opt) <= 1e-7
    assert int(state.step) == 2
    values = {k: float(v) for k, v in metrics.items()}
    assert values["applied"] == 1.0 and values["num_pairs"] == 0.0
    assert values["loss"] == 0.0 and values["grad_norm"] == 0.0
    state, metrics = up(state, _batch(sup.fixed_pairs(), dp=up.data_parallel_size))
    assert float(metrics["num_pairs"]) == 6.0 and float(metrics["grad_norm"]) > 0.0


def test_empty_batch_branch_holds_no_model_pass():
    """The step is one program with a two-way branch on "any valid row": the branch an empty
    batch takes holds no matrix product (the forward and backward passes are skipped), the
    other holds them all. (A second branch later in the program is the optimizer update's.)"""
    up = _empty_step(False)
    text = up.lower_call(_state(), _batch(sup.fixed_pairs())).as_text()
    assert text.count("stablehlo.case") + text.count('"stablehlo.if"') >= 1, "no branch"
    import re

    # Each branch region of the first case op (the microbatch's), in order: the empty branch is the first
    # (lax.cond's false branch), the compute branch the second.
    start = text.index("stablehlo.case")
    regions = re.split(r"\}, \{", text[start:].split("}) :", 1)[0])
    assert len(regions) == 2, len(regions)
    empty, compute = regions
    assert "dot_general" not in empty and "call @" not in empty
    assert "dot_general" in compute or "call @" in compute


def test_no_recompile_within_a_bucket():
    up = sup.update_step()
    pairs = sup.fixed_pairs(8, seed=3)
    state, _ = up(_state(), _batch(pairs[:5]))  # warm-up: the only compilation
    jax.block_until_ready(state)
    before = compile_counter.count()
    cache = up.cache_size()
    for n in (3, 7, 8, 1):
        state, metrics = up(state, _batch(pairs[:n]))
        assert float(metrics["num_pairs"]) == n
    jax.block_until_ready(state)
    assert compile_counter.count() == before
    assert up.cache_size() == cache


def test_dpo_margin_grows_and_ema_reference_follows_numpy():
    decay = 0.8
    pairs = sup.fixed_pairs()
    up = sup.update_step()
    p0 = sup.host(sup.init())
    state = _state(reference="ema")
    ema_np = sup.host(p0)
    batch = _batch(pairs)

    def margin_vs(params, ref):
        return np.array(
            [
                (
                    sup.seq_logprob(params, p.prompt_ids, p.chosen_ids)
                    - sup.seq_logprob(ref, p.prompt_ids, p.chosen_ids)
                )
                - (
                    sup.seq_logprob(params, p.prompt_ids, p.rejected_ids)
                    - sup.seq_logprob(ref, p.prompt_ids, p.rejected_ids)
                )
                for p in pairs
            ]
        )

    margins = []
    for _ in range(4):
        theta, theta_bar = sup.host(state.params), sup.host(state.ema_params)
        state, metrics = up(state, batch)
        # The step's margin is measured against θ̄, the EMA reference, before the update.
        assert float(metrics["margin"]) == pytest.approx(
            margin_vs(theta, theta_bar).mean(), abs=1e-4
        )
        state = ema_step(state, decay)
        ema_np = jax.tree.map(
            lambda e, p: decay * e + (1 - decay) * p, ema_np, sup.host(state.params)
        )
        assert sup.max_abs_diff(state.ema_params, ema_np) < 1e-6
        margins.append(margin_vs(sup.host(state.params), p0).mean())
    assert all(b > a for a, b in zip([0.0] + margins, margins)), margins


def test_nll_and_entropy_terms_match_full_logit_values():
    pairs = sup.fixed_pairs()
    up = sup.update_step("dpo", 1, None, sup.LR, 0.1, jnp.float32, False, 0.5, 0.1)
    p0 = sup.host(sup.init())
    _, m = up(_state(), _batch(pairs))
    nll = np.mean([-sup.seq_logprob(p0, p.prompt_ids, p.chosen_ids) for p in pairs])
    ent = np.mean(
        [
            (
                sup.seq_entropy(p0, p.prompt_ids, p.chosen_ids)
                + sup.seq_entropy(p0, p.prompt_ids, p.rejected_ids)
            )
            / 2
            for p in pairs
        ]
    )
    # θ̄ = θ: the DPO term is log 2 for every pair.
    assert float(m["loss"]) == pytest.approx(np.log(2) + 0.5 * nll - 0.1 * ent, rel=1e-5)


def test_ipo_pushes_margin_towards_target():
    pairs = sup.fixed_pairs()
    up = sup.update_step("ipo", 1, None, 1e-2, 0.0)
    state = init_player_state(sup.init(), sup.optimizer(1e-2, 0.0), reference="initial")
    p0 = sup.host(sup.init())
    state, m0 = up(state, _batch(pairs))
    assert float(m0["loss"]) == pytest.approx((1 / (2 * BETA)) ** 2, rel=1e-5)  # margin 0
    state, m1 = up(state, _batch(pairs))
    assert 0.0 < float(m1["margin"]) < 1 / (2 * BETA)
    assert float(m1["loss"]) < float(m0["loss"])
    assert sup.max_abs_diff(state.ref_params, p0) == 0.0  # θ₀ never moves


def test_grpo_moves_logprobs_with_the_advantage_sign():
    samples = sup.fixed_samples()
    up = sup.update_step("grpo", 1, None, 1e-2, 0.0)
    state = init_player_state(
        sup.init(), sup.optimizer(1e-2, 0.0), reference="initial", keep_ema=False
    )
    assert state.ema_params is None
    batch = collate_samples(samples, pad_id=sup.PAD, length_buckets=(16,))
    before = [sup.seq_logprob(state.params, s.prompt_ids, s.completion_ids) for s in samples]
    state, metrics = up(state, batch)
    after = [sup.seq_logprob(state.params, s.prompt_ids, s.completion_ids) for s in samples]
    assert float(metrics["num_samples"]) == 4.0
    assert float(metrics["kl_k3"]) == pytest.approx(0.0, abs=1e-7)  # θ = θ₀ before the step
    # Policy-gradient value is −Σ_t w_t·A; with θ = θ₀ the KL term is 0. Independent value:
    w = [
        np.minimum(
            np.exp(
                np.array(
                    [
                        sup.seq_logprob(sup.init(), s.prompt_ids, s.completion_ids[: k + 1])
                        - sup.seq_logprob(sup.init(), s.prompt_ids, s.completion_ids[:k])
                        for k in range(5)
                    ]
                )
                - np.array(s.sampler_logprobs)
            ),
            2.0,
        )
        if s.sampler_logprobs
        else np.ones(5)
        for s in samples
    ]
    want = np.mean([-np.sum(wi) * s.advantage for wi, s in zip(w, samples)])
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-4)
    for s, b, a in zip(samples, before, after):
        assert (a - b) * s.advantage > 0, (s.advantage, b, a)


def test_frozen_player_is_a_no_op():
    params = sup.init()
    state = init_player_state(params, trainable=False)
    assert state.opt_state is None and state.ema_params is None and not state.trainable
    new, metrics = sup.update_step()(state, _batch(sup.fixed_pairs()))
    assert new is state and metrics == {}
    assert ema_step(state, 0.5) is state
