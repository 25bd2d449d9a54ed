"""Step hooks: what the game loop does around its trainer steps, each on its own cadence.

A hook is a function of one :class:`StepInfo` with a cadence: it runs at steps ``first``,
``first + every``, ``first + 2·every``, … (``first`` defaults to ``every``; ``every=0``: never),
and at any step where its ``force`` predicate holds. A :class:`Hooks` list runs its due hooks
in the order they were added, so a hook sees what the hooks before it wrote (the record, the
agreed stop flag). ``experiment/loop.py`` keeps three lists: before a step's rollouts
(weight sync), after them (EMA, stage timings, validation, counters, the job-wide record,
warnings: what ``train_step`` returns), and after the step (metrics writing, the checkpoint).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging

from advgame_jax.experiment import compile_counter, hosts
from advgame_jax.experiment.assembly import ROLES, Game
from advgame_jax.experiment.players import sync_sampler
from advgame_jax.game.diagnosis import no_signal_warning
from advgame_jax.training.ema import ema_step


@dataclasses.dataclass
class StepInfo:
    """One trainer step as its hooks see it: ``step`` (1-based, the step being run), the
    run's ``state`` (each role's ``PlayerState`` and ``"rng"``; a hook may replace entries),
    the step's metrics ``record`` (hooks add keys or replace it), ``started`` (its
    ``time.perf_counter()`` start) and ``stop`` (the job-wide stop agreement, once made)."""

    step: int
    state: dict[str, Any]
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    started: float = 0.0
    stop: bool = False


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn`` with its cadence (module docstring)."""

    fn: Callable[[StepInfo], Any]
    every: int = 1
    first: Optional[int] = None
    force: Optional[Callable[[StepInfo], bool]] = None
    name: str = ""

    def due(self, info: StepInfo) -> bool:
        if self.force is not None and self.force(info):
            return True
        if self.every <= 0:
            return False
        first = self.every if self.first is None else self.first
        return info.step >= first and (info.step - first) % self.every == 0


class Hooks:
    """An ordered list of hooks; ``run`` calls the due ones."""

    def __init__(self) -> None:
        self._hooks: list[Hook] = []

    def add(
        self,
        fn: Callable[[StepInfo], Any],
        *,
        every: int = 1,
        first: Optional[int] = None,
        force: Optional[Callable[[StepInfo], bool]] = None,
        name: str = "",
    ) -> Hook:
        hook = Hook(fn, every, first, force, name or getattr(fn, "__name__", type(fn).__name__))
        self._hooks.append(hook)
        return hook

    def run(self, info: StepInfo) -> None:
        for hook in self._hooks:
            if hook.due(info):
                hook.fn(info)

    def __iter__(self) -> Iterator[Hook]:
        return iter(self._hooks)

    def names(self) -> list[str]:
        return [h.name for h in self._hooks]


# ---------------------------------------------------------------------- the game's hooks
class WeightSync:
    """Loads each player's sampling weights (its EMA under MD variants, else its trained
    params, ``train.sample_from``) into its sampler, stamped with the step. ``pending``: no
    sync since the run was built (or resumed); the next step or validation syncs first."""

    name = "weight_sync"

    def __init__(self, game: Game) -> None:
        self.game = game
        self.pending = True

    def sync(self, state: dict[str, Any], step: int) -> None:
        game = self.game
        with game.timer.stage("sync"):
            for r in ROLES:
                sync_sampler(
                    game.players[r],
                    state[r],
                    game.config.train.sample_from,
                    game.workdir,
                    version=step,
                )
        self.pending = False

    def ensure(self, state: dict[str, Any], step: int) -> None:
        if self.pending:
            self.sync(state, step)

    def __call__(self, info: StepInfo) -> None:
        self.sync(info.state, info.step)


def ema_hook(game: Game) -> Callable[[StepInfo], None]:
    """One EMA update per trained player (timed as part of the update stage)."""

    def ema(info: StepInfo) -> None:
        with game.timer.stage("update"):
            for r in ROLES:
                if game.players[r].trainable:
                    info.state[r] = ema_step(info.state[r], game.config.train.ema_decay)

    return ema


def stage_times_hook(game: Game) -> Callable[[StepInfo], None]:
    """The training step's stage timings (``time/<stage>``), before validation pops its own."""

    def stage_times(info: StepInfo) -> None:
        info.record.update(game.timer.pop())

    return stage_times


def step_time(info: StepInfo) -> None:
    """``time/step``: the whole step, validation included."""
    info.record["time/step"] = time.perf_counter() - info.started


def counters_hook(game: Game) -> Callable[[StepInfo], None]:
    """Counters since the start of the process: compilations, over-long prompts per role."""

    def counters(info: StepInfo) -> None:
        record = info.record
        record["sys/compilations"] = float(compile_counter.count())
        for r in ROLES:
            record[f"sys/{r}/prompt_too_long"] = float(
                game.players[r].sampler.stats()["prompt_too_long"]
            )

    return counters


def merge_records(info: StepInfo) -> None:
    """The job-wide record (``hosts.merge_records``)."""
    info.record = hosts.merge_records(info.record)


def diagnosis_warnings(info: StepInfo) -> None:
    """Warn about skipped non-finite updates and steps that carry no learning signal."""
    record = info.record
    skipped = [k for k, v in record.items() if k.endswith("/skipped_nonfinite") and v]
    if skipped:
        logging.warning(
            "step %d: non-finite loss or gradient, update skipped (%s)",
            info.step,
            ", ".join(k.rsplit("/", 1)[0] for k in skipped),
        )
    why = no_signal_warning(record)
    if why:
        logging.warning("step %d: %s", info.step, why)
