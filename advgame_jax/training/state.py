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

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

REFERENCES = ("ema", "initial")

# The precision policy of the paper configs (config fields in brackets) and why:
# - params θ [<role>.param_dtype] float32: lr 1e-6 updates of bf16 weights (8 significant bits)
#   round to nothing; fp32 master weights are what makes such small steps move the model.
# - Adam μ [optim.mu_dtype] float32 and ν (always the params' dtype): bf16 μ saves 2 bytes per
#   parameter and is a safe knob; ν spans many decades and stays fp32.
# - EMA θ̄ [train.ema_dtype] float32: with decay 0.95 the increment (1-d)(θ-θ̄) is ~5% of an lr
#   1e-6 step and vanishes in bf16; θ̄ is also the loss reference, so it must stay exact.
# - compute [<role>.compute_dtype] bfloat16: matmuls and activations; RMSNorm, RoPE, softmax,
#   log-sum-exp and all loss reductions accumulate in fp32 whatever the compute dtype.
# With this policy a player costs 16 bytes per parameter (θ, μ, ν, θ̄); under FSDP over N
# devices that is 16·P/N per device (docs/capacity.md has the measured plans).
PRECISION_DEFAULTS = dict(
    param_dtype="float32", mu_dtype="float32", ema_dtype="float32", compute_dtype="bfloat16"
)
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

    if TYPE_CHECKING:  # added by flax.struct.dataclass (``dataclasses.replace`` on self)

        def replace(self, **updates: Any) -> PlayerState: ...

    @property
    def trainable(self) -> bool:
        return self.opt_state is not None


def _copy(tree, dtype=None):
    # A real copy: the update step donates params, which must not free θ̄ or θ₀.
    return jax.tree.map(lambda x: jnp.array(x, dtype=dtype or x.dtype, copy=True), tree)


def init_player_state(
    params,
    optimizer: Optional[optax.GradientTransformation] = None,
    *,
    reference: str = "ema",
    keep_ema: bool = True,
    trainable: bool = True,
    ema_dtype=None,
) -> PlayerState:
    """Build a player's state from its initial params.

    ``params`` becomes the state's θ and is donated by the first update: pass a copy if the
    caller keeps using it.

    reference: 'ema' (MD variants: θ̄ is the reference, no extra copy) or 'initial' (a frozen
      copy θ₀ of ``params``). keep_ema: keep θ̄ (required for reference='ema'; an on-policy
      player that never samples from θ̄ can drop it to save one param copy).
    trainable=False: a frozen player (params only; its update and EMA steps are no-ops).
    ema_dtype: storage dtype of θ̄ (None: the params' dtype); see :data:`PRECISION_DEFAULTS`.
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
        ema_params=_copy(params, ema_dtype) if keep_ema else None,
        ref_params=_copy(params) if reference == "initial" else None,
        step=jnp.zeros((), jnp.int32),
    )


@dataclasses.dataclass(frozen=True)
class StateSettings:
    """What a player's state holds (``config.train`` and the role's block): the reference,
    what the sampler holds, storage dtypes, and whether the player trains at all."""

    reference: str = "ema"
    sample_from: str = "ema"
    ema_dtype: Any = None
    param_dtype: Any = jnp.float32
    trainable: bool = True

    @property
    def keep_ema(self) -> bool:
        """θ̄ is kept when it is the loss reference or what the sampler holds (the one place
        this rule lives)."""
        return self.reference == "ema" or self.sample_from == "ema"

    def init(self, params, optimizer: Optional[optax.GradientTransformation]) -> PlayerState:
        """The player's state at step 0 from its initial ``params`` (see
        :func:`init_player_state`; ``optimizer`` is ignored for a frozen player)."""
        return init_player_state(
            params,
            optimizer if self.trainable else None,
            reference=self.reference,
            keep_ema=self.keep_ema,
            trainable=self.trainable,
            ema_dtype=self.ema_dtype,
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
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
