"""``build_game(config) -> Game``: everything a training run is made of, built once.

In order, cheapest checks first: the config converted (``ConfigError`` if bad), the workdir
proven writable and locked (one run per workdir), the mesh, the seed files, the pair-bucket
capacity, the judge (endpoints are probed before any model loads), the toy world when asked
for, both players (checkpoint, sampler, update step), warnings about seeds no sampler can
read, the timed samplers, the seed iterators, the initial states and PRNG key, the
checkpointer, the resume (or ``init_from``) and the audit log. A failure anywhere releases the
workdir lock. The trainer loop (``experiment.loop.GameRunner``) runs steps over a ``Game``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging

from advgame_jax import fsutil, game, locking
from advgame_jax.data import SeedIterator
from advgame_jax.experiment import compile_counter, hosts
from advgame_jax.experiment.players import Player, build_player, initial_state, resolve_mesh
from advgame_jax.experiment.resume import ROLES, Progress, RunParts, restore_progress
from advgame_jax.experiment.timing import StageTimer, TimedJudge, TimedSampler
from advgame_jax.experiment.validate import (
    ConfigError,
    game_config_from_experiment,
    settings_from_config,
)
from advgame_jax.experiment.validation import SPLITS, load_seed_splits
from advgame_jax.game.templates import template_budget_warnings
from advgame_jax.settings import Settings
from advgame_jax.training.checkpoint import GameCheckpointer
from advgame_jax.training.multihost import host_to_global
from advgame_jax.training.sharding import batch_parallel_size, replicated

__all__ = ["ROLES", "Game", "Progress", "build_game", "report_unfit_seeds"]


@dataclasses.dataclass(frozen=True)
class Game:
    """The parts of one training run (``build_game``). The parts are fixed for the run;
    ``progress`` (states and step count) is what trainer steps change."""

    config: Any  # the experiment ConfigDict, as given (saved in every checkpoint)
    settings: Settings
    workdir: str
    lock: locking.DirLock
    mesh: Any
    game_config: game.GameConfig
    train_seeds: Mapping[str, list]
    valid_seeds: Mapping[str, list]
    timer: StageTimer
    judge: TimedJudge
    players: Mapping[str, Player]
    samplers: Mapping[str, TimedSampler]
    iterators: Mapping[str, SeedIterator]
    checkpointer: GameCheckpointer
    audit: Optional[game.AuditLog]
    progress: Progress


def build_game(config, *, judge=None, settings: Optional[Settings] = None) -> Game:
    """Build the run ``config`` describes (module docstring). ``judge``: a judge to use
    instead of the one ``config.judge`` names (tests); ``settings``: the conversion of this
    same config, when the caller already made it."""
    if settings is None:
        settings = settings_from_config(config)  # the one conversion; ConfigError if bad
    workdir = os.path.abspath(config.workdir)
    try:  # before anything is loaded: a read-only disk is found now, not at a save
        fsutil.check_writable_dir(workdir, "config.workdir")
    except OSError as e:
        raise ConfigError(str(e)) from None
    # One run per workdir: a second one is refused here, before anything loads.
    lock = locking.DirLock(workdir, "config.workdir")
    if hosts.is_writer():
        lock.acquire()
    try:
        return _assemble(config, settings, workdir, lock, judge)
    except BaseException:
        lock.release()
        raise


def _assemble(config, settings: Settings, workdir: str, lock: locking.DirLock, judge) -> Game:
    compile_counter.install()
    mesh = resolve_mesh(settings)
    train_seeds, valid_seeds = load_seed_splits(config)
    b = _seeds_per_split(settings, mesh)
    _check_pair_buckets(config, b)
    game_config = game_config_from_experiment(config, settings)
    # Cheap checks first: the judge (endpoints are probed) before loading any model.
    timer = StageTimer()
    timed_judge = TimedJudge(
        judge if judge is not None else _make_judge(config, settings, game_config, mesh), timer
    )
    hf_paths = {r: config[r].hf_path for r in ROLES}
    if config.toy_world:
        hf_paths = _toy_world_paths(config, workdir, game_config, train_seeds)
    players, params0 = _build_players(config, settings, hf_paths, mesh)
    report_unfit_seeds(players, train_seeds, valid_seeds, game_config, config.game.attacker_format)
    samplers = _timed_samplers(players, timer)
    iterators = _seed_iterators(config.seed, train_seeds, b)
    state = _initial_states(players, params0, settings, mesh, config.seed)
    checkpointer = GameCheckpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=config.train.checkpoint_every or 10**9,
        keep=config.train.keep_checkpoints,
    )
    progress = restore_progress(
        RunParts(checkpointer, players, iterators, mesh, config, workdir), state
    )
    audit = None
    if config.logging.audit_log and hosts.is_writer():
        audit = game.AuditLog(os.path.join(workdir, "audit", "trees.jsonl"))
    return Game(
        config=config,
        settings=settings,
        workdir=workdir,
        lock=lock,
        mesh=mesh,
        game_config=game_config,
        train_seeds=train_seeds,
        valid_seeds=valid_seeds,
        timer=timer,
        judge=timed_judge,
        players=players,
        samplers=samplers,
        iterators=iterators,
        checkpointer=checkpointer,
        audit=audit,
        progress=progress,
    )


def _seeds_per_split(settings: Settings, mesh) -> int:
    """B per split and process = this process's share of the global seeds per split
    (train.seeds_per_step, or seeds_per_device × data-parallel devices; hosts.py)."""
    return (
        settings.train.seeds_per_split(batch_parallel_size(mesh), jax.process_count())
        // jax.process_count()
    )


def _check_pair_buckets(config, b: int) -> None:
    """The largest pair bucket must hold every pair (GRPO: sample) one split can produce."""
    a, d = config.game.num_attacks, config.game.num_responses
    most_rows = b * a * d if config.loss.kind == "grpo" else b * a
    if config.train.pair_buckets and max(config.train.pair_buckets) < most_rows:
        raise ConfigError(
            f"config.train.pair_buckets: the largest bucket {max(config.train.pair_buckets)} "
            f"cannot hold the {most_rows} {'samples' if config.loss.kind == 'grpo' else 'pairs'} "
            f"a split can produce (B={b}, A={a}, D={d})"
        )


def _make_judge(config, settings: Settings, game_config: game.GameConfig, mesh):
    """The judge ``config.judge`` names (a sampler judge loads its model on ``mesh``)."""
    judge_sampler = judge_tok = None
    if config.judge.backend == "sampler":
        from advgame_jax.sampling.jax_sampler import JaxSampler
        from advgame_jax.tokenization import ChatTokenizer

        judge_sampler = JaxSampler.from_hf_dir(config.judge.hf_path, mesh=mesh)
        judge_tok = ChatTokenizer.from_dir(config.judge.hf_path)
    return game.make_judge(
        settings.judge,
        templates=game_config.templates,
        sampler=judge_sampler,
        tokenizer=judge_tok,
        seed=config.seed,
    )


def _toy_world_paths(
    config, workdir: str, game_config: game.GameConfig, train_seeds: Mapping[str, list]
) -> dict[str, str]:
    """Each player's checkpoint directory with the toy world built (``config.<role>.hf_path``
    where given, else the toy world's model of that role)."""
    from advgame_jax.experiment.toy_world import build_toy_world

    templates = game.get_template_set(game_config.templates)

    def build():
        return build_toy_world(
            config.toy_dir or os.path.join(workdir, "toy"),
            seed=config.seed,
            train_seeds=train_seeds["harmful"] + train_seeds["benign"],
            attacker_prompt_text=lambda s: templates.attacker_prompt(
                s.prompt, s.category, config.game.attacker_format
            ),
            warmup_steps=config.toy_warmup_steps,
        )

    # One process builds the shared toy world; the others then find it built.
    paths = None
    if hosts.is_writer():
        paths = build()
    hosts.barrier("toy_world")
    if not hosts.is_writer():
        paths = build()
    return {r: config[r].hf_path or getattr(paths, r) for r in ROLES}


def _build_players(
    config, settings: Settings, hf_paths: Mapping[str, str], mesh
) -> tuple[dict[str, Player], dict[str, Any]]:
    """Both players and their loaded params (same-architecture players share one update
    step). Optimizer updates: one per split per trainer step."""
    total_updates = 2 * config.train.num_steps
    players: dict[str, Player] = {}
    params0, update_steps = {}, {}
    for role in ROLES:
        players[role], params0[role] = build_player(
            config,
            role,
            hf_paths[role],
            mesh,
            settings=settings,
            total_updates=total_updates,
            update_steps=update_steps,
        )
    return players, params0


def report_unfit_seeds(
    players: Mapping[str, Player],
    train_seeds: Mapping[str, list],
    valid_seeds: Mapping[str, list],
    game_config: game.GameConfig,
    attacker_format: str,
) -> None:
    """Warn at load about seeds longer than the prompt budget of the sampler that reads
    them (training seeds: the attacker's; validation seeds: the defender's). They never
    crash a step: the sampler answers them with a MAX_LENGTH error, counted."""
    from advgame_jax.data.seeds import seeds_over_budget

    for role, seeds_by_split, what in (
        ("attacker", train_seeds, "training"),
        ("defender", valid_seeds, "validation"),
    ):
        player = players[role]
        budget = player.sampler.prompt_budget
        if not budget:
            continue
        if role == "attacker":  # the template alone may fill the prompt budget
            for msg in template_budget_warnings(
                game_config.templates,
                attacker_format,
                lambda t, tok=player.tokenizer: len(tok.render_user_turn(t)),
                budget,
            ):
                logging.warning("%s", msg)
        for split, seeds in seeds_by_split.items():
            bad = seeds_over_budget(
                seeds, lambda t, tok=player.tokenizer: len(tok.encode(t)), budget
            )
            if bad:
                logging.warning(
                    "%d of %d %s %s seeds are longer than the %s sampler's prompt budget "
                    "of %d tokens (first: #%d); they can never be played and will count "
                    "as MAX_LENGTH errors (sys/%s/prompt_too_long)",
                    len(bad),
                    len(seeds),
                    what,
                    split,
                    role,
                    budget,
                    bad[0],
                    role,
                )


def _timed_samplers(players: Mapping[str, Player], timer: StageTimer) -> dict[str, TimedSampler]:
    """Each player's sampler, its generation time recorded as ``<role>_generation``."""
    return {
        "attacker": TimedSampler(players["attacker"].sampler, timer, "attacker_generation"),
        "defender": TimedSampler(players["defender"].sampler, timer, "defender_generation"),
    }


def _seed_iterators(seed: int, train_seeds: Mapping[str, list], b: int) -> dict:
    """One iterator over each split's training seeds, ``b`` per batch, this process's shard."""
    return {
        c: SeedIterator(
            train_seeds[c],
            b,
            seed=seed + i,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
        for i, c in enumerate(SPLITS)
    }


def _initial_states(
    players: Mapping[str, Player], params0: Mapping[str, Any], settings: Settings, mesh, seed: int
) -> dict[str, Any]:
    """Each role's fresh ``PlayerState`` and, under ``"rng"``, the game's PRNG key."""
    state: dict[str, Any] = {r: initial_state(players[r], params0[r], settings) for r in ROLES}
    # Replicated over the mesh (a global array: every process can checkpoint it).
    state["rng"] = host_to_global(np.asarray(jax.random.PRNGKey(seed)), replicated(mesh))
    return state
