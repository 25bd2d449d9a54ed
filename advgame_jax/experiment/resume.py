"""What a run's checkpoint holds and how a run starts from it.

A checkpoint of the game: both players' ``PlayerState`` and the game's PRNG key (the state
tree), with a JSON meta of the step, the data-iterator positions (per process), each
player's model config and the experiment config. A run resumes from the latest checkpoint of
its workdir when there is one (refused, differing fields named, when it was written under
another config; fields marked resumable in ``advgame_jax.settings`` may differ), else starts
from ``config.init_from`` when given (``experiment.init_from``), else from the loaded models.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax
from absl import logging

from advgame_jax.data import SeedIterator
from advgame_jax.experiment import hosts
from advgame_jax.experiment.players import Player
from advgame_jax.experiment.validate import ADDED_FIELDS, RESUMABLE_FIELDS
from advgame_jax.training.checkpoint import GameCheckpointer, config_differences
from advgame_jax.training.sharding import replicated, state_shardings
from advgame_jax.training.state import abstract_player_state

ROLES = ("attacker", "defender")


@dataclasses.dataclass
class Progress:
    """What trainer steps change: ``state`` (each role's ``PlayerState`` and, under
    ``"rng"``, the game's PRNG key) and ``step`` (trainer steps done)."""

    state: dict[str, Any]
    step: int = 0


def abstract_state(state: Mapping[str, Any], players: Mapping[str, Player], mesh) -> dict:
    """The checkpoint's state tree as shapes, dtypes and shardings (what a restore fills)."""
    out = {}
    for r in ROLES:
        sh = state_shardings(state[r], players[r].model_config, mesh)
        out[r] = abstract_player_state(state[r], sh)
    out["rng"] = jax.ShapeDtypeStruct(
        state["rng"].shape, state["rng"].dtype, sharding=replicated(mesh)
    )
    return out


def checkpoint_meta(
    step: int, players: Mapping[str, Player], iterators: Mapping[str, SeedIterator], config
) -> dict:
    """The JSON meta saved next to the state tree at ``step``. With several processes the
    iterator positions are gathered from all of them (a collective: every process calls it)."""
    return {
        "step": step,
        # GAME_SPEC "Beyond the reference": the attacker inside is a controlled artifact.
        "advgame_controlled_artifact": {
            "contains": "attacker",
            "note": "trained red-teaming attacker; export "
            "(training.export.export_hf) and serving need an explicit flag",
        },
        # Each player's own model config: what an export writes as config.json.
        "models": {r: players[r].model_config.to_hf_dict() for r in ROLES},
        "iterators": hosts.gather_iterator_states({c: it.state() for c, it in iterators.items()}),
        "config": json.loads(config.to_json()),
    }


@dataclasses.dataclass(frozen=True)
class RunParts:
    """What a restore reads and fills: the run's ``checkpointer``, its ``players`` and data
    ``iterators`` (positions restored in place), its ``mesh``, ``config`` and ``workdir``."""

    checkpointer: GameCheckpointer
    players: Mapping[str, Player]
    iterators: Mapping[str, SeedIterator]
    mesh: Any
    config: Any
    workdir: str


def restore_progress(parts: RunParts, state: dict[str, Any]) -> Progress:
    """The run's starting point from ``state`` (the freshly built states): the latest
    checkpoint of the workdir, else ``config.init_from``'s states, else ``state`` itself."""
    config = parts.config
    current = json.loads(config.to_json())
    restored = parts.checkpointer.restore(
        abstract_state(state, parts.players, parts.mesh),
        check_meta=lambda meta: config_differences(
            meta.get("config", {}), current, ignore=RESUMABLE_FIELDS, added=ADDED_FIELDS
        ),
    )
    if restored is None:
        if config.get("init_from"):  # a new run continuing an old one
            from advgame_jax.experiment.init_from import states_from_checkpoint

            state.update(
                states_from_checkpoint(
                    config.init_from,
                    dict(parts.players),
                    {r: state[r] for r in ROLES},
                    config,
                )
            )
        return Progress(state)
    step, restored_state, meta = restored
    positions = hosts.own_iterator_states(meta["iterators"])
    for c, it in parts.iterators.items():
        if positions is not None:
            it.restore(positions[c])
    logging.info("resumed from checkpoint at step %d in %s", step, parts.workdir)
    return Progress(restored_state, int(meta["step"]))
