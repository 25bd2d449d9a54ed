"""A real tiny training run shared by the evaluation, red-team, report and conversion tests.

``tiny_run(tmp_path_factory)`` trains ``configs/tiny.py`` (its toy world, with the full toy
warm-up: a shorter one leaves the attacker unfaithful, so the defender gets no pairs) for two
steps with smaller batches, checkpointing at every step, and exports the
defender's EMA params of the last checkpoint to an HF directory. It is built once per test
run, shared by the test workers (``tests/shared_builds.py``; memoised here: a fixture imported
into several modules would be built once per module), and then only read.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil

from advgame_jax.data import packaged_seed_path

tiny = importlib.import_module("configs.tiny")
TOY_VALID = packaged_seed_path("toy_valid.jsonl")
_CACHE: dict = {}


@dataclasses.dataclass(frozen=True)
class TinyRun:
    workdir: str
    defender_hf: str  # defender EMA params of the last checkpoint, exported
    root: str


def tiny_config(workdir: str):
    c = tiny.get_config()
    c.workdir = workdir
    c.train.num_steps = 2  # the first update runs at learning rate 0 (warm-up)
    c.train.checkpoint_every = 1
    # Validation on a step discards that step's stage times (experiment/loop.py pops the
    # stage timer in validate()), so validate at steps 0 and 2 and keep step 1's times.
    c.train.validate_every = 2
    c.train.seeds_per_device = 4
    c.game.num_attacks = 2
    c.train.pair_buckets = (8,)
    c.attacker.sampler_min_batch_bucket = 8
    c.defender.sampler_min_batch_bucket = 16
    c.validation.num_seeds = 8
    c.logging.progress_bar = False
    c.logging.tensorboard = False
    return c


def tiny_run(tmp_path_factory) -> TinyRun:
    if "run" not in _CACHE:
        from tests import shared_builds

        toy = shared_builds.toy_world(tmp_path_factory)

        def build(root: str) -> None:
            from advgame_jax.evaluation.convert import checkpoint_to_hf
            from advgame_jax.experiment.loop import GameRunner

            workdir = os.path.join(root, "run")
            # The run's default toy directory, pre-filled with the identical toy world (same
            # config, seeds and settings stamp), which the run then reuses instead of rebuilding.
            shutil.copytree(toy, os.path.join(workdir, "toy"), symlinks=True)
            GameRunner(tiny_config(workdir)).run()
            checkpoint_to_hf(workdir, os.path.join(root, "defender_ema"))

        root = shared_builds.shared(tmp_path_factory, "eval_world", build)
        _CACHE["run"] = TinyRun(os.path.join(root, "run"), os.path.join(root, "defender_ema"), root)
    return _CACHE["run"]
