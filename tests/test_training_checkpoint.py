"""Orbax game checkpoints: bit-exact resume after a kill, damaged-checkpoint fallback with a
warning, in-flight saves never listed, sharded restore onto a mesh; HF export of an attacker
requires the explicit flag and carries the marker."""

import glob
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from advgame_jax.models import load_hf, make_mesh
from advgame_jax.training import (
    AttackerExportError,
    GameCheckpointer,
    abstract_player_state,
    collate_pairs,
    ema_step,
    export_hf,
    init_player_state,
    is_controlled_artifact,
    state_shardings,
)
from advgame_jax.training.export import CONFIG_FIELD, MARKER_FILE
from tests import test_training_support as sup

STEPS = 4
ROOT = str(pathlib.Path(__file__).resolve().parents[1])


def _game_state():
    return {
        "attacker": init_player_state(sup.init(0), sup.optimizer(), reference="ema"),
        "defender": init_player_state(sup.init(1), trainable=False),
        "rng": jax.random.key(7),
    }


def _abstract(state):
    return {
        "attacker": abstract_player_state(state["attacker"]),
        "defender": abstract_player_state(state["defender"]),
        "rng": jax.ShapeDtypeStruct(state["rng"].shape, state["rng"].dtype),
    }


def _train(state, start, stop, ckpt=None):
    """Steps start+1..stop; the batch of step k comes from data position k and the rng."""
    up = sup.update_step()
    pos = start
    for step in range(start + 1, stop + 1):
        rng, sub = jax.random.split(state["rng"])
        seed = int(jax.random.randint(sub, (), 0, 1000)) + pos
        batch = collate_pairs(sup.fixed_pairs(5, seed=seed), pad_id=sup.PAD, **sup.BUCKETS)
        pos += 1
        attacker, _ = up(state["attacker"], batch)
        state = dict(state, attacker=ema_step(attacker, 0.9), rng=rng)
        if ckpt is not None:
            # Async save, then the next update donates these very buffers.
            ckpt.save(step, state, {"data_position": pos, "config": {"lr": sup.LR}})
    return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run (checkpoints every 2 steps) and its final state on the host."""
    root = tmp_path_factory.mktemp("ckpt")
    with GameCheckpointer(root / "full", save_every=2, keep=3) as ckpt:
        final = sup.host(_train(_game_state(), 0, STEPS, ckpt))
    return root, final


_CHILD = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import tests.conftest  # same XLA flags and matmul precision as this session
from tests import test_training_checkpoint as t
from advgame_jax.training import GameCheckpointer
ckpt = GameCheckpointer(sys.argv[1], save_every=1, keep=3)
state = t._train(t._game_state(), 0, 2, ckpt)
t._train(state, 2, 3, ckpt)  # returns right after starting the async save of step 3
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_after_kill_is_bit_exact(runs, tmp_path, caplog):
    _, final = runs
    d = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(d)],
        cwd=ROOT,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    resumed = GameCheckpointer(d, save_every=2, keep=3)
    with caplog.at_level(logging.WARNING):
        step, state, meta = resumed.restore(_abstract(_game_state()))
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]
    # Step 3's save may or may not have committed before the kill; a partial one is never used.
    assert step in (2, 3) and meta == {"data_position": step, "config": {"lr": sup.LR}}
    assert int(state["attacker"].step) == step and state["defender"].opt_state is None
    state = sup.host(_train(state, step, STEPS, resumed))
    resumed.close()
    assert sup.max_abs_diff(state["attacker"], final["attacker"]) == 0.0
    assert sup.max_abs_diff(state["defender"], final["defender"]) == 0.0
    np.testing.assert_array_equal(state["rng"], final["rng"])


def _copy_run(root, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(root / "full", dst)
    assert sorted(os.listdir(dst)) == ["2", "4"]
    return dst


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_falls_back_with_warning(runs, tmp_path, caplog, damage):
    root, _ = runs
    d = _copy_run(root, tmp_path)
    files = sorted(glob.glob(str(d / "4" / "state" / "**" / "d" / "*"), recursive=True))
    assert files, "no array data files found in the checkpoint"
    for f in files:
        if damage == "truncate":
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
        else:
            os.remove(f)
    ckpt = GameCheckpointer(d, save_every=2, keep=3)
    with caplog.at_level(logging.WARNING):
        step, state, meta = ckpt.restore(_abstract(_game_state()))
    assert step == 2 and meta["data_position"] == 2 and int(state["attacker"].step) == 2
    assert any("damaged" in r.getMessage() and "/4" in r.getMessage() for r in caplog.records)
    assert ckpt.all_steps() == [2] and os.listdir(d / "quarantine") == ["4-0"]
    ckpt.close()


def test_in_flight_save_is_never_the_latest(runs, tmp_path):
    root, _ = runs
    d = _copy_run(root, tmp_path)
    # What a crash mid-save leaves behind: Orbax's tmp directory, never renamed to "6".
    shutil.copytree(d / "4", d / "6.orbax-checkpoint-tmp-1234")
    ckpt = GameCheckpointer(d, save_every=2, keep=3)
    assert ckpt.latest_step() == 4 and ckpt.all_steps() == [2, 4]
    # While an async save runs, only its tmp directory exists; the step appears on commit.
    state = _game_state()
    assert ckpt.save(6, state, {"data_position": 6})
    ckpt.wait()
    assert ckpt.latest_step() == 6
    assert sorted(os.listdir(d)) == ["2", "4", "6"]  # the crash leftover was cleaned up
    manifest = json.load(open(d / "6" / "advgame_manifest.json"))["files"]
    assert any(k.startswith("state/") for k in manifest)
    ckpt.close()


def test_restore_onto_mesh_has_requested_shardings(runs):
    root, final = runs
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    like = _game_state()
    shardings = {k: state_shardings(like[k], sup.CFG, mesh) for k in ("attacker", "defender")}
    abstract = {
        "attacker": abstract_player_state(like["attacker"], shardings["attacker"]),
        "defender": abstract_player_state(like["defender"], shardings["defender"]),
        "rng": jax.ShapeDtypeStruct(like["rng"].shape, like["rng"].dtype),
    }
    ckpt = GameCheckpointer(root / "full", save_every=2, keep=3)
    step, state, _ = ckpt.restore(abstract)
    ckpt.close()
    assert step == STEPS
    got = jax.tree.leaves(state["attacker"])
    want = jax.tree.leaves(shardings["attacker"])
    assert len(got) == len(want)
    for x, s in zip(got, want):
        assert x.sharding == s, (x.sharding, s)
    assert state["attacker"].params["layers"]["q_proj"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None
    )
    assert sup.max_abs_diff(state["attacker"], final["attacker"]) == 0.0


def test_attacker_export_requires_flag_and_is_marked(tmp_path):
    params = sup.init(3)
    with pytest.raises(AttackerExportError, match="allow_attacker_export"):
        export_hf(tmp_path / "att", sup.CFG, params, attacker=True)
    assert not os.path.exists(tmp_path / "att" / "config.json")

    path = export_hf(tmp_path / "att", sup.CFG, params, attacker=True, allow_attacker_export=True)
    marker = json.load(open(os.path.join(path, MARKER_FILE)))
    assert marker["controlled_red_teaming_artifact"] is True and marker["role"] == "attacker"
    assert json.load(open(os.path.join(path, "config.json")))[CONFIG_FIELD] == "attacker"
    assert is_controlled_artifact(path)
    config, loaded = load_hf(path)
    assert config == sup.CFG
    assert sup.max_abs_diff(loaded, params) == 0.0
    with pytest.raises(ValueError, match="exported attacker"):
        export_hf(path, sup.CFG, params)  # a defender export must not overwrite it

    d_path = export_hf(tmp_path / "def", sup.CFG, params)
    assert not is_controlled_artifact(d_path)
