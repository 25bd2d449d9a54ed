"""The AdvGame training loop (GAME_SPEC §2): what ``launch/train.py`` runs.

One trainer step:
  1. sync each player's sampler from its EMA (MD variants) or trained params, every
     ``train.sync_every_n_steps`` steps (and right after a resume);
  2. for the harmful split, then the benign split: play a B×A×D rollout tree, turn it into
     preference pairs (DPO / IPO) or GRPO samples, and make one optimizer update per trained
     player;
  3. one EMA update per trained player;
  4. every ``train.validate_every`` steps (and at step 0): the defender answers validation
     seeds directly, judged against the seeds (GAME_SPEC §4);
  5. one metrics record, and a checkpoint every ``train.checkpoint_every`` steps.

Resume: the latest checkpoint in ``<workdir>/checkpoints`` (both players' params, optimizer
states and EMA, the RNG key, data-iterator positions, the config) is restored automatically,
and ``metrics.jsonl`` is cut back to that step, so a resumed run writes exactly what an
uninterrupted one would (per-step sampling seeds derive from ``(config.seed, step)``).
SIGTERM / SIGINT finish the current step, save a checkpoint and exit cleanly. A finished run
is continued in a new workdir with ``config.init_from`` (``experiment.init_from``). One run per
workdir: ``locking.DirLock`` refuses a second one while the first is alive.

Faults are caught where they happen: the workdir is proven writable before any model loads;
a checkpoint written under another config is refused (differing fields named, nothing
touched; fields marked resumable in ``advgame_jax.settings`` may change between runs); a failed background save stops the
run at the next step boundary, naming the step; a non-finite loss or gradient skips that
update (``<split>/<role>/skipped_nonfinite``); a prompt longer than a sampler's budget is the
game's MAX_LENGTH error for its slot (``sys/<role>/prompt_too_long``).

Layout: ``experiment.assembly.build_game`` builds the run's parts (a ``Game``); this module's
``GameRunner`` plays the steps over them; what happens around a step (weight sync, EMA,
timings, validation, counters, warnings, metrics, checkpoints) are hooks with cadences
(``experiment.hooks``), registered here in the order the step has always run them.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Optional

import jax
from absl import logging

from advgame_jax import game
from advgame_jax.experiment import hosts
from advgame_jax.experiment.assembly import ROLES, Game, build_game
from advgame_jax.experiment.hooks import (
    Hooks,
    StepInfo,
    WeightSync,
    counters_hook,
    diagnosis_warnings,
    ema_hook,
    merge_records,
    stage_times_hook,
    step_time,
)
from advgame_jax.experiment.metrics import MetricsWriter, truncate_metrics
from advgame_jax.experiment.players import close_player
from advgame_jax.experiment.resume import checkpoint_meta
from advgame_jax.experiment.validation import SPLITS, _prefixed, validate_defender
from advgame_jax.settings import Settings
from advgame_jax.training.multihost import Bucketing, collate_global

# Console summary: label -> metric key.
CONSOLE_KEYS = {
    "val_def_harmful": "valid/harmful/reward",
    "val_def_benign": "valid/benign/reward",
    "att_harmful": "harmful/x/reward/mean",
    "att_benign": "benign/x/reward/mean",
    "def_harmful": "harmful/y/reward/mean",
    "def_benign": "benign/y/reward/mean",
    "s/step": "time/step",
}


def _part(name: str) -> Any:
    """A read-only runner attribute for the ``Game`` part ``name`` (``runner.players`` …)."""
    return property(lambda self: getattr(self.game, name), doc=f"The run's ``Game.{name}``.")


class GameRunner:
    """Runs trainer steps over the :class:`~advgame_jax.experiment.assembly.Game` that
    ``build_game(config)`` builds. Around each step it runs three hook lists
    (``experiment.hooks``): ``before_step`` (weight sync), ``record_hooks`` (what completes
    the step's metrics record: EMA, stage timings, validation, counters, the job-wide record,
    warnings) and ``after_step`` (in ``run``: metrics writing, the failed-save check, the
    stop agreement, the checkpoint). ``add`` a hook to any of them to extend the loop."""

    config = _part("config")
    settings = _part("settings")
    workdir = _part("workdir")
    mesh = _part("mesh")
    game_config = _part("game_config")
    train_seeds = _part("train_seeds")
    valid_seeds = _part("valid_seeds")
    timer = _part("timer")
    judge = _part("judge")
    players = _part("players")
    samplers = _part("samplers")
    iterators = _part("iterators")
    checkpointer = _part("checkpointer")
    audit = _part("audit")

    def __init__(self, config, *, judge=None, settings: Optional[Settings] = None):
        # ``settings``: the caller's conversion of this same config (else build_game converts).
        self.game: Game = build_game(config, judge=judge, settings=settings)
        self._stop_requested = False
        self._in_step = False
        self._writer: Any = _NullWriter()
        self._weights = WeightSync(self.game)
        self.before_step, self.record_hooks, self.after_step = Hooks(), Hooks(), Hooks()
        self._add_default_hooks()

    # The states and step count live in ``game.progress`` (what a checkpoint restores).
    @property
    def state(self) -> dict[str, Any]:
        return self.game.progress.state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self.game.progress.state = value

    @property
    def step(self) -> int:
        return self.game.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.game.progress.step = value

    def _add_default_hooks(self) -> None:
        g, t = self.game, self.config.train
        # Sampling weights: before steps 1, 1 + n, 1 + 2n, … and whenever not yet synced.
        self.before_step.add(
            self._weights,
            every=t.sync_every_n_steps,
            first=1,
            force=lambda _: self._weights.pending,
            name="weight_sync",
        )
        r = self.record_hooks
        r.add(ema_hook(g), name="ema")
        r.add(stage_times_hook(g), name="stage_times")
        r.add(self._validation, every=t.validate_every, name="validation")
        r.add(step_time)
        r.add(counters_hook(g), name="counters")
        r.add(merge_records)
        r.add(diagnosis_warnings)
        a = self.after_step
        a.add(self._write_metrics, name="metrics")
        # A background save that failed stops the run here, naming its step.
        a.add(lambda _: self.checkpointer.poll(), name="checkpoint_poll")
        a.add(self._agree_stop, name="stop_agreement")
        a.add(
            lambda _: self.save_checkpoint(force=True),
            every=t.checkpoint_every,
            force=lambda info: info.stop or info.step == t.num_steps,
            name="checkpoint",
        )

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, *, force: bool = False) -> bool:
        meta = checkpoint_meta(self.step, self.players, self.iterators, self.config)
        return self.checkpointer.save(self.step, self.state, meta, force=force)

    # ------------------------------------------------------------------ one step
    def _update(self, role: str, scored, split: str) -> dict:
        player = self.players[role]
        if not player.trainable:
            return {}
        upd = player.update
        t = self.config.train
        # Each record carries its weight in the update objective (game.normalization).
        if self.config.loss.kind == "grpo":
            records = game.with_weight(
                game.grpo_samples(scored, role, self.config.loss.grpo_baseline),
                game.sample_weight(scored, role, t.loss_normalization),
            )
        else:
            records = game.with_weight(
                game.pairs(scored, role),
                game.pair_weight(scored, role, t.loss_normalization, t.norm_seeds_per_microbatch),
            )
        # This process's records → one global batch (one process: plain collation).
        batch = collate_global(
            records,
            kind="samples" if self.config.loss.kind == "grpo" else "pairs",
            pad_id=player.tokenizer.pad_id,
            mesh=self.mesh,
            bucketing=Bucketing(
                num_microbatches=t.num_microbatches,
                row_buckets=tuple(t.pair_buckets),
                length_buckets=tuple(t.length_buckets),
                overflow="truncate_prompt",
            ),
        )
        with self.timer.stage("update"):
            self.state[role], m = upd(self.state[role], batch)
            m = jax.device_get(m)
        return _prefixed(f"{split}/{role}/", m)

    def _play(self, i: int, split: str, record: dict) -> None:
        """Split ``split`` (the step's ``i``-th): one rollout tree, one update per player."""
        seeds = self.iterators[split].next_batch()
        scored = game.build_tree(
            seeds,
            self.game_config,
            judge=self.judge,
            attacker=self.samplers["attacker"],
            attacker_tokenizer=self.players["attacker"].tokenizer,
            defender=self.samplers["defender"],
            defender_tokenizer=self.players["defender"].tokenizer,
            sample_index=(2 * self.step + i) * jax.process_count() + jax.process_index(),
        )
        if self.audit is not None:
            self.audit.write(scored, step=self.step, split=split)
        record.update(_prefixed(f"{split}/", game.tree_metrics(scored)))
        for role in ROLES:
            record.update(self._update(role, scored, split))

    def train_step(self) -> dict:
        """Run one trainer step (``self.step`` += 1) and return its metrics record."""
        info = StepInfo(step=self.step + 1, state=self.state, started=time.perf_counter())
        self._in_step = True
        self.step = info.step
        self.before_step.run(info)
        for i, split in enumerate(SPLITS):
            self._play(i, split, info.record)
        self.record_hooks.run(info)
        self._in_step = False
        return info.record

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        """Defender-only validation (GAME_SPEC §4) with the defender's sampling weights
        (``experiment.validation``)."""
        t0 = time.perf_counter()
        self._weights.ensure(self.state, self.step)
        out = validate_defender(
            self.valid_seeds,
            self.game_config,
            self.config.validation,
            judge=self.judge,
            defender=self.samplers["defender"],
            tokenizer=self.players["defender"].tokenizer,
        )
        self.timer.pop()  # validation's own stage times: reported as one number
        out["time/validation"] = time.perf_counter() - t0
        return hosts.merge_records(out)

    def _validation(self, info: StepInfo) -> None:
        info.record.update(self.validate())

    def close(self) -> None:
        """Shut down the players' inference engines (offloaded processes, colocated engines),
        release the workdir's lock and drop the players' states (idempotent). The runner is
        referenced by its own hooks, so without ``close`` its states (several GB for a real
        model) live until Python's cycle collector runs. ``with GameRunner(c) as r: r.run()``
        closes it."""
        for player in self.players.values():
            close_player(player)
        self.game.lock.release()
        self.game.progress.state = {}

    def __enter__(self) -> "GameRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the run
    def _on_signal(self, signum, frame) -> None:
        if self._in_step:
            logging.warning(
                "signal %d received: finishing step %d, then checkpointing", signum, self.step
            )
        else:
            logging.warning(
                "signal %d received: stopping after step %d, checkpointing", signum, self.step
            )
        self._stop_requested = True

    def _write_metrics(self, info: StepInfo) -> None:
        self._writer.write(info.step, info.record)

    def _agree_stop(self, info: StepInfo) -> None:
        # The loop stops on the AGREED flag only: a signal seen by any process stops every
        # process after the same step (a signal landing after an agreement counts at the
        # next one), with one checkpoint of that step.
        info.stop = hosts.any_process(self._stop_requested)

    def _open_writer(self) -> Any:
        """Process 0's metrics writer (``metrics.jsonl`` cut back to the current step)."""
        cfg = self.config
        if not hosts.is_writer():
            return _NullWriter()
        self.game.lock.acquire()  # held since __init__; again after an earlier run() ended
        truncate_metrics(os.path.join(self.workdir, "metrics.jsonl"), self.step)
        return MetricsWriter(
            self.workdir,
            total_steps=cfg.train.num_steps,
            tensorboard=cfg.logging.tensorboard,
            wandb_project=cfg.logging.wandb_project,
            progress_bar=cfg.logging.progress_bar,
            config_json=cfg.to_json(),
            console_keys=CONSOLE_KEYS,
        )

    def _steps(self, max_steps: Optional[int]) -> tuple[dict, bool]:
        """Trainer steps with their after-step hooks until the end, ``max_steps`` steps or
        an agreed stop; returns the last record and whether a stop was agreed."""
        last: dict = {}
        steps_done = 0
        stop = hosts.any_process(self._stop_requested)
        while self.step < self.config.train.num_steps and not stop:
            if max_steps is not None and steps_done >= max_steps:
                break
            last = self.train_step()
            steps_done += 1
            info = StepInfo(step=self.step, state=self.state, record=last)
            self.after_step.run(info)
            stop = info.stop
        return last, stop

    def _close_run(self, handlers: dict) -> None:
        for s, h in handlers.items():
            signal.signal(s, h)
        try:
            self.checkpointer.close()
        finally:
            self._writer.close()
            self._writer = _NullWriter()
            if self.audit is not None:
                self.audit.close()
            self.game.lock.release()

    def run(self, *, max_steps: Optional[int] = None) -> dict:
        """Train until ``train.num_steps`` (or ``max_steps`` more steps, or a signal)."""
        if not self.game.progress.state:
            raise RuntimeError("GameRunner.run() after close(): build a new GameRunner")
        self._writer = self._open_writer()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.step == 0 and self.config.train.validate_every:
                self._writer.write(0, self.validate())
            last, stop = self._steps(max_steps)
        finally:
            self._close_run(old)
        if stop:
            logging.warning(
                "stopped cleanly at step %d; rerun the same command to resume", self.step
            )
        return last


class _NullWriter:
    """The metrics writer of processes other than process 0: writes nothing."""

    def write(self, step, record) -> None:
        pass

    def close(self) -> None:
        pass


def run_from_config(config, *, judge=None, settings: Optional[Settings] = None) -> dict:
    """Build a :class:`GameRunner` for ``config`` (``settings``: its conversion, when the caller
    already has it) and run it to the end; returns the last record."""
    runner = GameRunner(config, judge=judge, settings=settings)
    try:
        return runner.run()
    finally:
        runner.close()
