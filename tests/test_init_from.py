"""Continuing a finished run (issue 17 item 19): a new workdir with ``config.init_from`` starts
from the old checkpoint's params and EMA of both players with a fresh optimizer and schedule;
a checkpoint of another model is refused naming the array."""

import os

import jax
import numpy as np
import pytest

from advgame_jax.evaluation.targets import find_step_dir
from advgame_jax.experiment.loop import GameRunner
from advgame_jax.experiment.validate import ConfigError
from advgame_jax.sampling.checkpoints import restore_params
from advgame_jax.training import GameCheckpointer
from tests.eval_world import tiny_run
from tests.test_checkpoint_faults import CONFIG, _state
from tests.test_train_loop import tiny_config

pytestmark = pytest.mark.slow


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def test_new_run_starts_from_the_old_checkpoint(tmp_path, toy_dir, tmp_path_factory):
    old = tiny_run(tmp_path_factory)
    step_dir = find_step_dir(old.workdir)
    c = tiny_config(
        tmp_path / "more",
        toy_dir,
        init_from=old.workdir,
        train__num_steps=1,
        train__checkpoint_every=1,
        train__validate_every=0,
    )
    runner = GameRunner(c)
    assert runner.step == 0
    for role in ("attacker", "defender"):
        st = runner.state[role]
        want = restore_params(step_dir, key_path=(role, "params"))
        want_ema = restore_params(step_dir, key_path=(role, "ema_params"))
        assert _same(st.params, want), role
        assert _same(st.ema_params, want_ema), role
        assert not _same(want, want_ema)  # really two different trees were loaded
        assert int(st.step) == 0  # a fresh optimizer: the new schedule starts at update 0
    runner.run()
    assert runner.step == 1
    assert sorted(os.listdir(tmp_path / "more" / "checkpoints"))[0] == "1"
    runner.close()


def test_checkpoint_of_another_model_is_refused(tmp_path, toy_dir):
    other = tmp_path / "other" / "checkpoints"
    with GameCheckpointer(other, save_every=1, keep=1) as ckpt:
        ckpt.save(1, _state(0), {"config": CONFIG})  # a different, tiny attacker
    c = tiny_config(tmp_path / "new", toy_dir, init_from=str(tmp_path / "other"))
    with pytest.raises(
        ConfigError,
        match=r"config\.init_from=.*attacker params of this "
        r"run's model",
    ):
        GameRunner(c)
    with pytest.raises(ConfigError, match=r"config\.init_from=.*expected a training workdir"):
        GameRunner(tiny_config(tmp_path / "new2", toy_dir, init_from=str(tmp_path)))
    assert not os.path.exists(tmp_path / "new" / "checkpoints" / "1")
