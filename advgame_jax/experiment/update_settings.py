"""The one mapping from an experiment's settings to a player's update-step and state settings.

``player_training(settings, role)`` reads the typed ``loss``, ``optim``, ``train`` and
``<role>`` sections (``advgame_jax.settings``; a ConfigDict is converted first) and returns
plain frozen values (``training.update.UpdateSettings``, ``training.state.StateSettings``).
The trainer (``experiment.players``), the capacity planner (``training.planning``) and the
step benchmarks build the step from these values with ``training.update.update_step_from``,
so every one of them compiles the same program for the same config
(``tests/test_one_update_step.py`` compares their lowered HLO).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from advgame_jax.settings import OptimSettings
from advgame_jax.training.optimizer import OptimizerSettings
from advgame_jax.training.state import StateSettings
from advgame_jax.training.update import LossSettings, StepSettings, UpdateSettings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class PlayerTraining:
    """A player's update-step settings and state settings."""

    update: UpdateSettings
    state: StateSettings


def optimizer_settings(optim: OptimSettings, num_trainer_steps: int) -> OptimizerSettings:
    """The ``optim`` section for a run of ``num_trainer_steps`` trainer steps (two optimizer
    updates each, one per seed split); see ``training.optimizer`` for the two schedule shapes."""
    cycle = optim.lr_schedule == "cycle"
    n = int(num_trainer_steps)
    return OptimizerSettings(
        lr=float(optim.lr),
        num_steps=n if cycle else 2 * n,
        b1=float(optim.b1),
        b2=float(optim.b2),
        weight_decay=float(optim.weight_decay),
        clip_norm=float(optim.clip_norm),
        final_lr_fraction=float(optim.final_lr_fraction),
        warmup_steps=int(optim.warmup_steps),
        restart=cycle,
        mu_dtype=jnp.dtype(optim.mu_dtype) if optim.mu_dtype else None,
    )


def player_training(config, role: str) -> PlayerTraining:
    """Every setting of ``role``'s update step and state that the config decides (``config``:
    the converted :class:`Settings`, or a ConfigDict, converted here)."""
    from advgame_jax.experiment.validate import as_settings

    s = as_settings(config)
    L, T, pc = s.loss, s.train, s.player(role)
    loss = LossSettings(
        kind=str(L.kind),
        beta=float(L.beta),
        length_normalization=bool(L.length_normalization),
        nll_coef=float(L.nll_coef),
        entropy_coef=float(L.entropy_coef),
        kl_coef=float(L.kl_coef),
        tis_cap=float(L.tis_cap) if L.tis_cap else None,
        tis_detach=bool(L.tis_detach),
    )
    train = StepSettings(
        compute_dtype=DTYPES[pc.compute_dtype],
        num_microbatches=int(T.num_microbatches),
        max_tokens_per_device=int(T.max_tokens_per_device) or None,
        chunk_size=int(T.logprob_chunk_size),
        remat=str(T.remat_policy),
        attention_impl=str(T.attention),
        step_on_empty=bool(T.step_on_empty_batch),
    )
    state = StateSettings(
        reference=str(T.reference),
        sample_from=str(T.sample_from),
        ema_dtype=DTYPES[T.ema_dtype],
        param_dtype=DTYPES[pc.param_dtype],
        trainable=bool(pc.trainable),
    )
    return PlayerTraining(
        update=UpdateSettings(
            loss=loss, optim=optimizer_settings(s.optim, T.num_steps), train=train
        ),
        state=state,
    )
