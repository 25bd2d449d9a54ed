"""Continuing a finished run in a new workdir (``config.init_from``): both players' params and
EMA come from a checkpoint of the old run, everything else starts afresh.

A finished run cannot be resumed with more steps (``train.num_steps`` is part of the
schedule, so it is refused on resume). Instead, a NEW workdir with ``init_from`` set to the
old run's workdir, its ``checkpoints/`` or one ``checkpoints/<step>`` directory starts at
step 0 with the old run's θ and θ̄ for each player, a fresh optimizer state and learning-rate
schedule (``train.num_steps``, warm-up, decay of the new config), fresh data iterators and
RNG. With ``train.reference='initial'`` the loaded params are the new run's θ₀. A checkpoint
whose params do not have this run's model shapes is refused naming the array; nothing is
loaded. Once the new workdir holds its own checkpoint, that checkpoint is resumed as usual
and ``init_from`` is not read again.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from advgame_jax.experiment.players import initial_state
from advgame_jax.experiment.validate import ConfigError


def _step_dir(path: str) -> str:
    from advgame_jax.evaluation.targets import TargetError, find_step_dir

    try:
        return find_step_dir(path)
    except TargetError as err:
        raise ConfigError(
            f"config.init_from={path!r}: expected a training workdir, its "
            f"checkpoints/ directory or a checkpoints/<step> directory "
            f"({str(err).split(': ', 1)[-1]})"
        ) from None


def _restore(step_dir: str, role: str, key: str, like):
    from advgame_jax.sampling.checkpoints import restore_params

    return restore_params(step_dir, key_path=(role, key), like=like)


def states_from_checkpoint(path: str, players: dict, states: dict, config) -> dict:
    """``{role: PlayerState}`` initialised from the checkpoint at ``path`` (see module doc);
    ``states``: the run's freshly built states (their arrays give shapes and shardings)."""
    step_dir = _step_dir(path)
    out = {}
    for role, player in players.items():
        try:
            params = _restore(step_dir, role, "params", states[role].params)
        except ValueError as err:
            raise ConfigError(
                f"config.init_from={path!r}: the checkpoint at {step_dir} does "
                f"not hold {role} params of this run's model (another model "
                f"family or size?): {err}"
            ) from None
        new = initial_state(player, params, config)
        if new.ema_params is not None:
            try:
                new = new.replace(ema_params=_restore(step_dir, role, "ema_params", new.ema_params))
            except ValueError as err:
                if "not found" not in str(err):
                    raise ConfigError(
                        f"config.init_from={path!r}: {role} EMA params of "
                        f"{step_dir} do not match this run's model: {err}"
                    ) from None
                logging.warning(
                    "config.init_from: %s has no %s EMA params; the EMA starts from its params",
                    step_dir,
                    role,
                )
        out[role] = new
    jax.block_until_ready(out)
    logging.info(
        "initialised both players' params and EMA from %s (step %s); optimizer, "
        "schedule, data order and RNG start afresh",
        step_dir,
        os.path.basename(step_dir),
    )
    return out
