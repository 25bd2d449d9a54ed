"""The per-player training state (GAME_SPEC "Names": trained params θ, EMA copy θ̄, optimizer
state, reference) and the helpers that pick which params a variant samples from or compares
against.

Which arrays exist encodes the variant, so no static flag has to travel with the pytree (the
checkpoint tree stays plain arrays):

==========================  =========  ==========  ============  ===============
player                      params θ   opt_state   ema_params θ̄   ref_params
==========================  =========  ==========  ============  ===============
MD (reference='ema')        fp32       AdamW       θ̄             None (θ̄ is it)
on-policy / GRPO            fp32       AdamW       θ̄ or None     θ₀ (initial)
frozen (fixed attacker)     θ₀         None        None          None
==========================  =========  ==========  ============  ===============

``reference_params``: ``ref_params`` if present, else ``ema_params``, else ``params``.
``sampling_params(state, 'ema'|'trained')``: θ̄ when asked and present, else θ.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

REFERENCES = ("ema", "initial")
SAMPLE_FROM = ("ema", "trained")


@flax.struct.dataclass
class PlayerState:
    """One player's trainable state; a pytree of arrays (``None`` fields have no leaves).

    params: fp32 master params θ (the model's param tree).
    opt_state: the optax state, or None for a frozen player.
    ema_params: θ̄ (same tree and dtype as params) or None.
    ref_params: frozen initial params θ₀ when the reference is 'initial', else None.
    step: int32 scalar, number of optimizer updates applied (skipped empty batches and frozen
      players do not advance it).
    """

    params: Any
    opt_state: Any = None
    ema_params: Any = None
    ref_params: Any = None
    step: Any = None

    @property
    def trainable(self) -> bool:
        return self.opt_state is not None


def _copy(tree):
    # A real copy: the update step donates params, which must not free θ̄ or θ₀.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def init_player_state(params, optimizer: Optional[optax.GradientTransformation] = None, *,
                      reference: str = "ema", keep_ema: bool = True,
                      trainable: bool = True) -> PlayerState:
    """Build a player's state from its initial params.

    ``params`` becomes the state's θ and is donated by the first update: pass a copy if the
    caller keeps using it.

    reference: 'ema' (MD variants: θ̄ is the reference, no extra copy) or 'initial' (a frozen
      copy θ₀ of ``params``). keep_ema: keep θ̄ (required for reference='ema'; an on-policy
      player that never samples from θ̄ can drop it to save one param copy).
    trainable=False: a frozen player (params only; its update and EMA steps are no-ops).
    """
    if not trainable:
        return PlayerState(params=params, step=jnp.zeros((), jnp.int32))
    if reference not in REFERENCES:
        raise ValueError(f"train.reference must be one of {REFERENCES}, got {reference!r}")
    if reference == "ema" and not keep_ema:
        raise ValueError("train.reference='ema' needs the EMA params (keep_ema=True)")
    if optimizer is None:
        raise ValueError("a trainable player needs an optimizer (see make_optimizer)")
    return PlayerState(
        params=params,
        opt_state=optimizer.init(params),
        ema_params=_copy(params) if keep_ema else None,
        ref_params=_copy(params) if reference == "initial" else None,
        step=jnp.zeros((), jnp.int32),
    )


def reference_params(state: PlayerState):
    """The loss reference π_ref: θ₀ if kept, else θ̄, else θ (frozen player)."""
    if state.ref_params is not None:
        return state.ref_params
    if state.ema_params is not None:
        return state.ema_params
    return state.params


def sampling_params(state: PlayerState, sample_from: str = "ema"):
    """Params the player's sampler should hold: θ̄ for 'ema' (when kept), θ for 'trained'."""
    if sample_from not in SAMPLE_FROM:
        raise ValueError(f"train.sample_from must be one of {SAMPLE_FROM}, got {sample_from!r}")
    if sample_from == "ema" and state.ema_params is not None:
        return state.ema_params
    return state.params


def abstract_player_state(state: PlayerState, shardings=None):
    """``jax.ShapeDtypeStruct`` tree of ``state`` (for restore); ``shardings``: a matching
    tree of shardings (e.g. from ``training.sharding.state_shardings``) or None."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
