"""The update step at the paper's scale, proven by compiling (never running) it on 8 virtual
CPU devices; and the pieces that make it fit, checked numerically at tiny size: chunked
attention, token-budget microbatches, per-shard log-probs on data/fsdp/tensor meshes,
record weights and optimizer steps on empty batches."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advgame_jax.models import make_mesh
from advgame_jax.models.attention import causal_attention
from advgame_jax.training import collate_pairs, init_player_state, shard_state
from advgame_jax.training.update import (
    LossSettings,
    StepSettings,
    make_update_step,
    microbatch_count,
)
from advgame_jax.types import TokenPair
from tests import test_training_support as sup

GIB = 1024**3
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path):
    """The typed settings of the config file at ``path`` (what the planner reads)."""
    import importlib.util

    from advgame_jax.experiment.validate import settings_from_config

    spec = importlib.util.spec_from_file_location("cfg", ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return settings_from_config(mod.get_config(), complete=False)


def _weight_like(model_config, fsdp):
    """Sorted dims of every param (per layer, whole and as one FSDP shard)."""
    from advgame_jax.models.params import param_shapes

    shapes = set()
    for s in jax.tree.leaves(param_shapes(model_config)):
        for dims in (s.shape, s.shape[1:]):
            shapes.add(tuple(sorted(dims)))
            for i, d in enumerate(dims):
                if d % fsdp == 0:
                    shapes.add(tuple(sorted(dims[:i] + (d // fsdp,) + dims[i + 1 :])))
    return shapes


def _check_plan(path, max_temp_gib=40.0):
    from advgame_jax.training.planning import format_plan, plan_experiment

    plan = plan_experiment(_load(path), devices=8, device_memory_gib=131.0, seq_len=4096)
    print(format_plan(plan))
    assert plan["mesh"] == dict(data=1, fsdp=8, tensor=1)
    assert plan["fits"], plan["verdict"]
    from advgame_jax.training.planning import model_config_for

    cfg = _load(path)
    for role, p in plan["players"].items():
        assert p["compiled"]
        # Arguments are the state split 8 ways (plus a small batch).
        assert abs(p["argument_bytes"] - p["state_bytes"] / 8) <= 0.05 * p["state_bytes"] / 8
        assert p["temp_bytes"] <= max_temp_gib * GIB, (role, p["temp_bytes"] / GIB)
        # Every collective moves weights (or small scalars), never [rows, T, ...] activations.
        allowed = _weight_like(model_config_for(cfg, role), 8)
        for c in p["collectives"]:
            if c["bytes"] < 2**20:
                continue
            assert all(tuple(sorted(d)) in allowed for d in c["dims"]), c
    # The paper's defender batch: 4 seeds × 2 attacks per device, one pair each, T = 4096.
    assert plan["players"]["defender"]["rows"] == 64
    return plan


def test_llama_8b_update_step_fits_with_fsdp_on_8_devices():
    _check_plan("configs/llama_ipo_md.py")


@pytest.mark.slow
def test_qwen_7b_update_step_fits_with_fsdp_on_8_devices():
    _check_plan("configs/qwen_dpo_md.py")


def test_planner_cli_says_does_not_fit_without_fsdp(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "plan.py"),
            "--config=configs/llama_ipo_md.py",
            "--devices=8",
            "--config.mesh.data=-1",
            "--config.mesh.fsdp=1",
            f"--json={tmp_path / 'p.json'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "does not fit" in out.stdout and "states alone" in out.stdout, out.stdout


def test_chunked_attention_equals_full_scores():
    rng = np.random.default_rng(0)
    b, t, h, k, hd = 2, 24, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, h, hd)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, t, k, hd)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, k, hd)), jnp.float32)
    mask = np.ones((b, t), bool)
    mask[1, 17:] = False  # right padding

    def numpy_ref():
        qn, kn, vn = (np.asarray(x, np.float64) for x in (q, kk, v))
        out = np.zeros((b, t, h, hd))
        for bi in range(b):
            for hi in range(h):
                kv = hi // (h // k)
                s = qn[bi, :, hi] @ kn[bi, :, kv].T / np.sqrt(hd)
                allowed = np.tril(np.ones((t, t), bool)) & mask[bi][None]
                s = np.where(allowed, s, -np.inf)
                p = np.exp(s - s.max(-1, keepdims=True))
                out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ vn[bi, :, kv]
        return out

    want = numpy_ref()
    for impl, budget in (("xla", 1 << 26), ("chunked", b * h * t * 6)):  # 4 query chunks
        got = causal_attention(q, kk, v, jnp.asarray(mask), impl=impl, budget=budget)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    g = jax.grad(
        lambda x: causal_attention(
            x, kk, v, jnp.asarray(mask), impl="chunked", budget=b * h * t * 6
        ).sum()
    )(q)
    g_ref = jax.grad(lambda x: causal_attention(x, kk, v, jnp.asarray(mask), impl="xla").sum())(q)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5)


def test_microbatch_count_from_token_budget():
    assert microbatch_count(8, 8192, max_tokens_per_device=8192) == 8
    assert microbatch_count(8, 4096, max_tokens_per_device=16384) == 2
    assert microbatch_count(8, 100, max_tokens_per_device=10_000) == 1
    assert microbatch_count(6, 100, num_microbatches=4, max_tokens_per_device=10_000) == 6
    assert microbatch_count(8, 100, num_microbatches=2) == 2
    assert microbatch_count(4, 10_000, max_tokens_per_device=100) == 4


@pytest.mark.parametrize(
    "mesh_shape",
    [
        pytest.param((8, 1, 1), marks=pytest.mark.slow),
        pytest.param((1, 8, 1), marks=pytest.mark.slow),
        (2, 2, 2),
    ],
)
def test_sharded_chunked_budgeted_step_matches_single_device(mesh_shape):
    pairs = sup.fixed_pairs()
    ref_state, ref_m = sup.update_step()(
        init_player_state(sup.init(), sup.optimizer()),
        collate_pairs(pairs, pad_id=sup.PAD, **sup.BUCKETS),
    )
    mesh = make_mesh(*mesh_shape)
    up = make_update_step(
        sup.CFG,
        sup.optimizer(),
        LossSettings(kind="dpo", beta=0.1),
        StepSettings(
            compute_dtype=jnp.float32,
            chunk_size=64,
            remat="full",
            attention_impl="chunked",
            max_tokens_per_device=32,
        ),
        mesh=mesh,
    )
    dp = up.data_parallel_size
    batch = collate_pairs(pairs, pad_id=sup.PAD, data_parallel_size=dp, **sup.BUCKETS)
    state = shard_state(init_player_state(sup.init(), sup.optimizer()), sup.CFG, mesh)
    state, m = up(state, batch)
    assert sup.max_abs_diff(sup.host(state.params), sup.host(ref_state.params)) <= 1e-5
    for k in ("loss", "margin", "num_pairs", "grad_norm"):
        assert float(m[k]) == pytest.approx(float(ref_m[k]), abs=1e-5), k
    before = up.cache_size()
    state, _ = up(state, batch)  # outputs feed back without a recompile
    assert up.cache_size() == before


def test_record_weights_scale_the_objective():
    pairs = sup.fixed_pairs(4)
    w = (0.5, 0.25, 0.0, 1.0)
    weighted = [
        TokenPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, weight=x) for p, x in zip(pairs, w)
    ]
    batch = collate_pairs(weighted, pad_id=sup.PAD, **sup.BUCKETS)
    np.testing.assert_allclose(batch.pair_weight[:4], w)
    assert np.all(batch.pair_weight[4:] == 0)
    plain = collate_pairs(pairs, pad_id=sup.PAD, **sup.BUCKETS)
    np.testing.assert_allclose(plain.pair_weight[:4], 0.25)
    with pytest.raises(ValueError, match="every record carries a weight or none"):
        collate_pairs(weighted[:2] + pairs[2:], pad_id=sup.PAD, **sup.BUCKETS)

    # Σ w_i loss_i: the gradient equals the weighted sum of single-pair gradients, which we
    # read from SGD steps (lr 1, no clipping): Δθ = -Σ w_i ∇loss_i.
    sgd = optax.sgd(1.0)
    up = make_update_step(
        sup.CFG,
        sgd,
        LossSettings(kind="dpo", beta=0.1),
        StepSettings(compute_dtype=jnp.float32, chunk_size=64, remat=False),
    )
    p0 = sup.init()

    def delta(recs):
        st = init_player_state(jax.tree.map(jnp.copy, p0), sgd)
        st, _ = up(st, collate_pairs(recs, pad_id=sup.PAD, **sup.BUCKETS))
        return jax.tree.map(
            lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
            sup.host(st.params),
            sup.host(p0),
        )

    # With θ̄ = θ every pair has the same loss log 2 but its own gradient.
    want = None
    for p, x in zip(pairs, w):
        d = delta([TokenPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, weight=1.0)])
        d = jax.tree.map(lambda a, x=x: x * a, d)
        want = d if want is None else jax.tree.map(np.add, want, d)
    assert sup.max_abs_diff(delta(weighted), want) < 1e-6


@pytest.mark.parametrize("step_on_empty", [False, True])
def test_empty_batch_optimizer_step(step_on_empty):
    opt = sup.optimizer()
    up = make_update_step(
        sup.CFG,
        opt,
        LossSettings(kind="dpo", beta=0.1),
        StepSettings(
            compute_dtype=jnp.float32, chunk_size=64, remat=False, step_on_empty=step_on_empty
        ),
    )
    state, _ = up(
        init_player_state(sup.init(), opt),
        collate_pairs(sup.fixed_pairs(), pad_id=sup.PAD, **sup.BUCKETS),
    )
    before = sup.host(state)
    state, m = up(state, collate_pairs([], pad_id=sup.PAD, **sup.BUCKETS))
    if not step_on_empty:
        assert sup.max_abs_diff(state.params, before.params) == 0.0
        assert int(state.step) == 1 and float(m["applied"]) == 0.0
        return
    # optax with zero gradients is the expectation: momentum decays, weight decay applies.
    zeros = jax.tree.map(jnp.zeros_like, before.params)
    upd, want_opt = opt.update(zeros, before.opt_state, before.params)
    want = optax.apply_updates(before.params, upd)
    assert sup.max_abs_diff(state.params, want) < 1e-7
    assert sup.max_abs_diff(state.opt_state, want_opt) < 1e-7
    assert sup.max_abs_diff(state.params, before.params) > 0.0
    assert int(state.step) == 2 and float(m["applied"]) == 1.0
    assert all(np.isfinite(float(v)) for v in m.values())


def test_train_step_benchmark_runs_at_cpu_size(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "train_step_bench", ROOT / "benchmarks" / "train_step.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--steps", "2", "--json", str(tmp_path / "b.json")])  # asserts inside
    assert out["tokens"] == 2 * 4 * 64 and out["step_s"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["params"] == out["params"]
