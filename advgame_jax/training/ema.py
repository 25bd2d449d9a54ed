"""The EMA copy θ̄ of a player's params (GAME_SPEC §2.13): θ̄ ← d·θ̄ + (1−d)·θ, once per trainer
step (not once per optimizer update: the game makes one update per seed split).

``ema_update`` is the pure formula; ``ema_step`` is the jitted per-player step that donates
the state so θ̄ is updated in place. The decay is a traced argument, so changing it does not
recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from advgame_jax.training.state import PlayerState


def ema_update(ema, params, decay):
    """θ̄ ← d·θ̄ + (1−d)·θ leafwise, computed in fp32 and stored in θ̄'s dtype."""
    d = jnp.asarray(decay, jnp.float32)

    def one(e, p):
        out = d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)
        return out.astype(e.dtype)

    return jax.tree.map(one, ema, params)


def _ema_step(state: PlayerState, decay):
    return state.replace(ema_params=ema_update(state.ema_params, state.params, decay))


_ema_step_donated = jax.jit(_ema_step, donate_argnums=0)


def ema_step(state: PlayerState, decay: float) -> PlayerState:
    """One EMA update of ``state.ema_params``; a no-op for players without θ̄ (frozen or
    on-policy without EMA). ``state`` is donated: do not reuse the argument afterwards."""
    if state.ema_params is None:
        return state
    return _ema_step_donated(state, jnp.float32(decay))
