"""The game loop end to end (issue: launch/train.py, configs, resume, the offline default).

The offline toy world is built once per session (``toy_dir`` fixture) and shared. The
learning margins come from 30-step runs of ``configs/tiny.py`` with seeds 0, 1 and 2 (table in
README.md, "Learning curves of the offline default"): the smallest defender gain seen was
+4.8 (so > 2.0 leaves room for platform differences); the frozen-defender attacker margin is
explained at ``ATTACKER_MARGIN``. CPU runs with the same seed and set-up are deterministic.
"""

import importlib
import json
import os
import signal

import jax
import numpy as np
import pytest

from advgame_jax import game
from advgame_jax.experiment.loop import GameRunner
from advgame_jax.experiment.validate import ConfigError

tiny = importlib.import_module("configs.tiny")
# Trained-minus-untrained attacker reward (steps 21-30, common random numbers), measured in
# this test's set-up on 2026-12-04 for seeds 0-4: benign +1.09, +1.70, +1.08, +0.81, +1.06;
# harmful -0.71, +0.06, +0.39, -1.02, -0.31. Seed 0 on two earlier trees: benign +0.29 and
# +0.28, harmful -0.47 and +0.43. The benign gain was above 0.2 in all seven runs; the
# harmful one, and so the mean of both, changed sign with the seed and with numerically small
# code changes, so only the benign gain is asserted. Plain DPO without the NLL anchor gave
# < -3 (mean of both splits).
ATTACKER_MARGIN = 0.2


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tiny_config(workdir, toy_dir, **overrides):
    c = tiny.get_config()
    c.workdir = str(workdir)
    c.toy_dir = toy_dir
    c.logging.progress_bar = False
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _mean(records, key, steps):
    vals = [r[key] for r in records if r["step"] in steps and r.get(key) is not None]
    assert vals, f"no {key} in steps {steps}"
    return float(np.mean(vals))


@pytest.mark.slow
def test_tiny_game_learns_and_stops_compiling(tmp_path, toy_dir):
    """Defender validation reward rises on both splits; no compilation after warm-up."""
    c = tiny_config(
        tmp_path / "run",
        toy_dir,
        train__num_steps=30,
        train__validate_every=10,
        train__checkpoint_every=0,
    )
    GameRunner(c).run()
    rec = read_metrics(c.workdir)
    by_step = {r["step"]: r for r in rec}
    for split, margin in (("harmful", 2.0), ("benign", 2.0)):
        start = by_step[0][f"valid/{split}/reward"]
        end = by_step[30][f"valid/{split}/reward"]
        assert end - start > margin, (split, start, end)
    # Fixed buckets: after step 10 (warm-up incl. one validation) nothing compiles.
    assert by_step[30]["sys/compilations"] == by_step[10]["sys/compilations"]
    assert all(by_step[s]["time/step"] > 0 for s in range(1, 31))


@pytest.mark.slow
def test_frozen_defender_attacker_reward_rises(tmp_path, toy_dir):
    """With the defender frozen, the trained attacker beats an untrained copy of itself.

    The control run freezes the attacker too; sampling seeds derive from (seed, step), so both
    runs see the same random numbers and their per-step difference isolates what was learned.
    """
    kw = dict(
        train__num_steps=30,
        train__validate_every=0,
        train__checkpoint_every=0,
        defender__trainable=False,
    )
    c = tiny_config(tmp_path / "run", toy_dir, **kw)
    GameRunner(c).run()
    ctrl = tiny_config(tmp_path / "ctrl", toy_dir, attacker__trainable=False, **kw)
    GameRunner(ctrl).run()
    rec, base = read_metrics(c.workdir), read_metrics(ctrl.workdir)
    keys = ("harmful/x/reward/mean", "benign/x/reward/mean")
    gain = {k: _mean(rec, k, range(21, 31)) - _mean(base, k, range(21, 31)) for k in keys}
    early = {k: _mean(rec, k, range(1, 6)) - _mean(base, k, range(1, 6)) for k in keys}
    print("attacker gain over the untrained attacker, steps 21-30:", gain, "steps 1-5:", early)
    # The benign split's gain (the attacker learns to make the defender over-refuse); the
    # harmful split's is printed only: at this size it swings by ±1 between seeds.
    assert gain["benign/x/reward/mean"] > ATTACKER_MARGIN, (gain, early)
    assert not any(k.startswith(("harmful/defender/", "benign/defender/")) for k in rec[-1])


def test_close_frees_the_states_and_sampler_weights_at_once(tmp_path, toy_dir):
    """The runner is referenced by its own hooks (a cycle), so its arrays would otherwise wait
    for Python's cycle collector: ``close`` drops them; ``run`` after it is refused."""
    import gc
    import weakref

    runner = GameRunner(tiny_config(tmp_path / "run", toy_dir, train__num_steps=1))
    refs = [
        weakref.ref(jax.tree.leaves(runner.state[r].params)[0]) for r in ("attacker", "defender")
    ]
    refs += [
        weakref.ref(jax.tree.leaves(runner.players[r].sampler.inner.params)[0])
        for r in ("attacker", "defender")
    ]
    gc.disable()  # what is freed must be freed by close, not by a collection
    try:
        with runner:
            assert all(ref() is not None for ref in refs)
        assert [ref() for ref in refs] == [None] * 4
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match=r"after close\(\)"):
        runner.run()
    runner.close()  # idempotent


class SigtermDuringStep:
    """A rule judge that sends this process a real SIGTERM while step ``at`` is running."""

    def __init__(self, at):
        self.judge, self.at, self.runner, self.sent = game.RuleJudge(), at, None, False

    def faithfulness(self, requests):
        return self.judge.faithfulness(requests)

    def pairwise(self, requests):
        if self.runner is not None and self.runner.step == self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return self.judge.pairwise(requests)

    def pointwise(self, requests):
        return self.judge.pointwise(requests)

    def fault_counts(self):
        return self.judge.fault_counts()


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "sys/"))} for r in records]


def test_resume_after_sigterm_is_bit_exact(tmp_path, toy_dir):
    kw = dict(train__num_steps=6, train__checkpoint_every=3, train__validate_every=3)
    ref = GameRunner(tiny_config(tmp_path / "ref", toy_dir, **kw))
    ref.run()

    c = tiny_config(tmp_path / "cut", toy_dir, **kw)
    judge = SigtermDuringStep(at=4)
    first = GameRunner(c, judge=judge)
    judge.runner = first
    first.run()
    assert judge.sent and first.step == 4  # finished the step, checkpointed, stopped
    assert (
        sorted(int(d) for d in os.listdir(tmp_path / "cut" / "checkpoints") if d.isdigit())[-1] == 4
    )
    second = GameRunner(c)  # a fresh process would do exactly this
    assert second.step == 4
    second.run()
    assert second.step == 6

    for role in ("attacker", "defender"):
        for field in ("params", "ema_params"):
            a = jax.tree.leaves(getattr(ref.state[role], field))
            b = jax.tree.leaves(getattr(second.state[role], field))
            assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)), (
                role,
                field,
            )
    assert _comparable(read_metrics(c.workdir)) == _comparable(read_metrics(ref.workdir))


# ---------------------------------------------------------------- bad inputs stop early
def test_bad_inputs_stop_before_training(tmp_path, toy_dir):
    with pytest.raises(ConfigError, match=r"config\.game\.num_attacks"):
        GameRunner(tiny_config(tmp_path / "a", toy_dir, game__num_attacks=0))
    with pytest.raises(ConfigError, match=r"config\.game\.templates: expected one of .*'nope'"):
        GameRunner(tiny_config(tmp_path / "b", toy_dir, game__templates="nope"))
    with pytest.raises(
        ConfigError, match=r"config\.data\.train_harmful: seed file .* does not exist"
    ):
        GameRunner(
            tiny_config(
                tmp_path / "c", toy_dir, data__train_harmful=str(tmp_path / "missing.jsonl")
            )
        )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "category": "harmful"}\n{"prompt": "x", "category": "evil"}\n')
    from advgame_jax.data import SeedFileError

    with pytest.raises(SeedFileError, match=r"bad\.jsonl:2"):
        GameRunner(tiny_config(tmp_path / "d", toy_dir, data__train_harmful=str(bad)))
    c = tiny_config(
        tmp_path / "e",
        toy_dir,
        judge__backend="endpoint",
        judge__endpoints=("http://127.0.0.1:9/v1",),
        judge__model="judge",
        judge__timeout_s=1.0,
    )
    with pytest.raises(game.JudgeEndpointError, match=r"127\.0\.0\.1:9"):
        GameRunner(c)
    with pytest.raises(
        ConfigError,
        match=r"config\.train\.pair_buckets: the largest bucket 8 cannot hold the 32 pairs",
    ):
        GameRunner(tiny_config(tmp_path / "f", toy_dir, train__pair_buckets=(8,)))
    for sub in "abcdef":  # nothing was trained or checkpointed
        assert not os.path.exists(tmp_path / sub / "checkpoints")
