"""Shardings of training pytrees beyond the params: player states, optimizer states and token
batches, over the model core's ``(data, fsdp, tensor)`` mesh and logical axis rules.

* Params θ, θ̄, θ₀ and every optimizer-state subtree shaped like the params (Adam's moments)
  follow ``advgame_jax.models.param_shardings``; other optimizer leaves (counts, injected
  hyperparameters) and ``step`` are replicated.
* Batches are split on their leading (row) dim over the logical ``batch`` axis
  (``data × fsdp`` with the default rules); all other dims are replicated.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from advgame_jax.models import DEFAULT_RULES, ModelConfig, logical_to_spec, param_shardings
from advgame_jax.training.state import PlayerState


def batch_parallel_size(mesh: Mesh | None, rules=DEFAULT_RULES) -> int:
    """Number of devices a batch's leading dim is split over (1 without a mesh)."""
    if mesh is None:
        return 1
    target = rules.get("batch")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _row_sharding(x, mesh: Mesh, rules) -> NamedSharding:
    axes = ("batch",) + (None,) * (len(x.shape) - 1)
    return NamedSharding(mesh, logical_to_spec(x.shape, axes, mesh, rules))


def batch_shardings(batch, mesh: Mesh, rules=DEFAULT_RULES):
    """Tree of ``NamedSharding`` matching ``batch`` (rows split over the ``batch`` axis)."""
    return jax.tree.map(lambda x: _row_sharding(x, mesh, rules), batch)


def shard_batch(batch, mesh: Mesh | None, rules=DEFAULT_RULES):
    """Put a numpy batch on the mesh, rows split over devices (as is without a mesh)."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, batch)
    return jax.device_put(batch, batch_shardings(batch, mesh, rules))


def state_shardings(
    state: PlayerState, config: ModelConfig, mesh: Mesh, rules=DEFAULT_RULES
) -> PlayerState:
    """A :class:`PlayerState` of ``NamedSharding`` matching ``state`` (arrays or abstract)."""
    p_shard = param_shardings(config, mesh, rules)
    p_def = jax.tree.structure(p_shard)
    rep = replicated(mesh)

    def like_params(x):
        return x is not None and jax.tree.structure(x) == p_def

    def of(tree):
        if tree is None:
            return None
        return jax.tree.map(
            lambda sub: p_shard if like_params(sub) else rep, tree, is_leaf=like_params
        )

    return PlayerState(
        params=p_shard,
        opt_state=of(state.opt_state),
        ema_params=None if state.ema_params is None else p_shard,
        ref_params=None if state.ref_params is None else p_shard,
        step=None if state.step is None else rep,
    )


def shard_state(
    state: PlayerState, config: ModelConfig, mesh: Mesh | None, rules=DEFAULT_RULES
) -> PlayerState:
    """Place a player's state on the mesh with :func:`state_shardings` (as is without one)."""
    if mesh is None:
        return state
    return jax.device_put(state, state_shardings(state, config, mesh, rules))
