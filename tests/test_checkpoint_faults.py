"""Checkpoint faults told apart: a same-size corruption is damage (checksum → fallback to the
previous good step), a checkpoint of another config or state structure is refused with the
differing fields named and nothing moved; a failed background save surfaces at the next
step boundary naming its step; a non-finite loss or gradient never reaches the params."""

import errno
import glob
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from advgame_jax.training import GameCheckpointer, collate_pairs, init_player_state
from advgame_jax.training.checkpoint import (
    CheckpointError,
    CheckpointIncompatibleError,
    config_differences,
)
from tests import test_training_support as sup

CONFIG = {
    "loss": {"beta": 0.1, "kind": "dpo"},
    "train": {"num_steps": 4, "buckets": [8]},
    "workdir": "/a",
}


def _state(seed=0):
    return {
        "attacker": init_player_state(sup.init(seed), sup.optimizer(), reference="ema"),
        "rng": jax.random.key(7),
    }


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


@pytest.fixture
def two_steps(tmp_path):
    """Checkpoints of steps 1 and 2 (different params) with the default options."""
    d = tmp_path / "ckpt"
    with GameCheckpointer(d, save_every=1, keep=3) as ckpt:
        ckpt.save(1, _state(0), {"config": CONFIG})
        ckpt.save(2, _state(1), {"config": CONFIG})
    return d


def _listing(d):
    return sorted(os.path.relpath(p, d) for p in glob.glob(str(d / "**"), recursive=True))


def test_same_size_corruption_is_damage_and_falls_back(two_steps, caplog):
    files = [
        f
        for f in glob.glob(str(two_steps / "2" / "state" / "**" / "*"), recursive=True)
        if os.path.isfile(f)
    ]
    target = max(files, key=os.path.getsize)
    size = os.path.getsize(target)
    with open(target, "r+b") as f:  # flip bytes in the middle: the size does not change
        f.seek(size // 2)
        chunk = f.read(16)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert os.path.getsize(target) == size
    ckpt = GameCheckpointer(two_steps, save_every=1, keep=3)
    with caplog.at_level(logging.WARNING):
        step, state, _ = ckpt.restore(_abstract(_state()))
    assert step == 1
    want = jax.tree.leaves(_state(0)["attacker"].params)
    got = jax.tree.leaves(state["attacker"].params)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(want, got))
    assert any("crc32" in r.getMessage() for r in caplog.records)
    assert os.listdir(two_steps / "quarantine") == ["2-0"]
    ckpt.close()


def test_other_structure_is_refused_and_nothing_moves(two_steps):
    before = _listing(two_steps)
    wanted = _abstract(_state())
    embed = wanted["attacker"].params["embed"]
    wanted["attacker"].params["embed"] = jax.ShapeDtypeStruct(
        (embed.shape[0] * 2, embed.shape[1]), embed.dtype
    )
    ckpt = GameCheckpointer(two_steps, save_every=1, keep=3)
    with pytest.raises(CheckpointIncompatibleError, match=r"attacker/params/embed: shape"):
        ckpt.restore(wanted)
    ckpt.close()
    assert _listing(two_steps) == before  # no quarantine, nothing deleted


def test_other_config_is_refused_naming_the_fields(two_steps):
    before = _listing(two_steps)
    now = {**CONFIG, "loss": {"beta": 0.2, "kind": "dpo"}, "workdir": "/b"}
    check = lambda meta: config_differences(meta["config"], now, ignore=("workdir",))  # noqa: E731
    ckpt = GameCheckpointer(two_steps, save_every=1, keep=3)
    with pytest.raises(CheckpointIncompatibleError) as err:
        ckpt.restore(_abstract(_state()), check_meta=check)
    assert "config.loss.beta: 0.1 in the checkpoint, 0.2 now" in str(err.value)
    assert "config.workdir" not in str(err.value)
    assert _listing(two_steps) == before
    # The same config (tuples and JSON lists compare equal) resumes the newest step.
    same = {**CONFIG, "train": {"num_steps": 4, "buckets": (8,)}, "workdir": "/b"}
    step, _, _ = ckpt.restore(
        _abstract(_state()),
        check_meta=lambda m: config_differences(m["config"], same, ignore=("workdir",)),
    )
    assert step == 2
    ckpt.close()


def test_failed_background_save_surfaces_naming_its_step(tmp_path, monkeypatch):
    async def disk_full(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full)
    ckpt = GameCheckpointer(tmp_path / "ckpt", save_every=1, keep=3)
    assert ckpt.save(3, _state(), {"config": CONFIG})
    deadline = time.time() + 60
    with pytest.raises(CheckpointError, match=r"step 3 .*No space left on device"):
        while time.time() < deadline:  # what the loop does after every step
            ckpt.poll()
            time.sleep(0.05)
    monkeypatch.undo()
    ckpt.close()


def test_nonfinite_loss_skips_the_update_and_is_counted():
    up = sup.update_step()
    batch = collate_pairs(sup.fixed_pairs(5, seed=3), pad_id=sup.PAD, **sup.BUCKETS)
    state = init_player_state(sup.init(0), sup.optimizer(), reference="ema")
    # A poisoned reference (e.g. a corrupted EMA) makes the loss and every gradient NaN.
    poisoned = state.replace(
        ema_params=jax.tree.map(lambda x: x.at[...].set(jnp.nan), state.ema_params)
    )
    before = sup.host(poisoned.params)
    new, m = up(poisoned, batch)
    assert not np.isfinite(float(m["loss"]))
    assert float(m["skipped_nonfinite"]) == 1.0 and float(m["applied"]) == 0.0
    assert int(new.step) == 0
    after = sup.host(new.params)
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
    )
    # A healthy batch is applied and not counted.
    new, m = up(init_player_state(sup.init(0), sup.optimizer(), reference="ema"), batch)
    assert float(m["skipped_nonfinite"]) == 0.0 and float(m["applied"]) == 1.0


def test_fields_added_later_match_an_older_checkpoint_only_at_their_old_behaviour():
    """A checkpoint written before a field existed: the field at the value that reproduces the
    older code resumes; any other value is a change of the game, named."""
    from advgame_jax.experiment.validate import ADDED_FIELDS

    old = {"loss": {"beta": 0.1}, "defender": {"hf_path": "/m"}, "train": {"num_steps": 3}}
    same = {
        "loss": {"beta": 0.1},
        "defender": {"hf_path": "/m", "max_new_tokens": 0},
        "train": {"num_steps": 3, "seeds_per_step": 0},
        "init_from": "",
    }
    assert config_differences(old, same, added=ADDED_FIELDS) == []
    other = {**same, "defender": {"hf_path": "/m", "max_new_tokens": 64}}
    assert config_differences(old, other, added=ADDED_FIELDS) == [
        "config.defender.max_new_tokens: 0 in the checkpoint, 64 now"
    ]
    # Without the table the new field is a difference, as before.
    assert config_differences(old, same) != []
