"""Sampler weight restore from Orbax: plain params dirs, the game checkpointer's layout
(sub-tree by key path, latest step), target dtypes / shardings, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from advgame_jax.models import ModelConfig, init_params, make_mesh, param_shardings
from advgame_jax.sampling.checkpoints import resolve_item_dir, restore_params, save_params
from advgame_jax.training.checkpoint import GameCheckpointer
from advgame_jax.training.state import init_player_state

CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
)


def _params(seed):
    return init_params(CONFIG, jax.random.key(seed))


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_plain_standard_save_dir(tmp_path):
    params = _params(0)
    save_params(str(tmp_path / "p"), params)
    _assert_tree_equal(restore_params(str(tmp_path / "p")), params)
    # into a bf16, sharded target
    mesh = make_mesh(tensor=2)
    shardings = param_shardings(CONFIG, mesh)
    like = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=s), params, shardings
    )
    got = restore_params(str(tmp_path / "p"), like=like)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    assert got["embed"].sharding == shardings["embed"]
    np.testing.assert_allclose(
        np.asarray(got["embed"], np.float32), np.asarray(params["embed"]), rtol=1e-2
    )


def test_game_checkpointer_layout_restores_one_subtree(tmp_path):
    tx = optax.sgd(0.1)
    attacker = init_player_state(_params(1), tx)
    defender = init_player_state(_params(2), tx)
    defender = defender.replace(ema_params=_params(3))
    with GameCheckpointer(str(tmp_path / "run"), save_every=1, keep=3, async_save=False) as ck:
        ck.save(
            1,
            {
                "attacker": attacker,
                "defender": defender,
                "rng": jax.random.key_data(jax.random.key(0)),
            },
            {"note": "first"},
        )
        ck.save(
            2,
            {
                "attacker": attacker,
                "defender": defender.replace(ema_params=_params(4)),
                "rng": jax.random.key_data(jax.random.key(0)),
            },
            {"note": "second"},
        )
    root = str(tmp_path / "run")
    assert resolve_item_dir(root).endswith("/2/state")  # the latest step
    got = restore_params(root, key_path=("defender", "ema_params"), like=_params(0))
    _assert_tree_equal(got, _params(4))
    got = restore_params(f"{root}/1", key_path=("defender", "ema_params"))
    _assert_tree_equal(got, _params(3))
    got = restore_params(f"{root}/1/state", key_path=("attacker", "params"))
    _assert_tree_equal(got, _params(1))


def test_clear_errors(tmp_path):
    save_params(str(tmp_path / "p"), {"defender": {"ema_params": _params(0)}})
    with pytest.raises(ValueError, match="not a directory"):
        restore_params(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no Orbax PyTree found"):
        restore_params(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="key 'attacker' not found; available: \\['defender'\\]"):
        restore_params(str(tmp_path / "p"), key_path=("attacker", "ema_params"))
    with pytest.raises(ValueError, match="tree structure"):
        restore_params(str(tmp_path / "p"), key_path=("defender",), like=_params(0))
    small = ModelConfig(
        model_type="llama",
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
    )
    with pytest.raises(ValueError, match="shape"):
        restore_params(
            str(tmp_path / "p"),
            key_path=("defender", "ema_params"),
            like=init_params(small, jax.random.key(0)),
        )


def test_orbax_manager_without_game_checkpointer(tmp_path):
    params = _params(5)
    mgr = ocp.CheckpointManager(str(tmp_path / "m"))
    mgr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
    mgr.wait_until_finished()
    _assert_tree_equal(restore_params(str(tmp_path / "m"), key_path=("params",)), params)
