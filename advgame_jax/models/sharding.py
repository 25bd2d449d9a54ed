"""Logical-axis sharding for the params: the ONE place mapping logical names to mesh axes.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with params sharded) and
``tensor`` (heads / MLP width / vocab split across devices). A dimension whose size is not
divisible by its mesh axes' size is replicated instead (tiny models on big meshes), and a
mesh axis is used at most once per array.
"""

from __future__ import annotations

import math
import types
from typing import Any, Mapping, Optional, Sequence, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from advgame_jax.models.config import ModelConfig
from advgame_jax.models.params import _is_leaf, param_shapes_and_axes

MESH_AXES = ("data", "fsdp", "tensor")

AxisRule = Union[None, str, tuple[str, ...]]
DEFAULT_RULES: Mapping[str, AxisRule] = types.MappingProxyType(
    {
        "batch": ("data", "fsdp"),  # activations / token batches
        "seq": None,
        "cache_len": None,
        "layers": None,
        "vocab": "tensor",
        "embed": "fsdp",
        "q_heads": "tensor",
        "kv_heads": "tensor",
        "head_dim": None,
        "mlp": "tensor",
    }
)


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence[Any]] = None
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axis types over the first data*fsdp*tensor
    devices (``jax.devices()`` by default), laid out by ``jax.make_mesh``: on TPUs the grid
    follows the physical ICI torus (rings for the collectives of each axis), on GPUs device-id
    order, elsewhere the given order. One host or one TPU slice; several:
    ``distributed.build_mesh``."""
    n = data * fsdp * tensor
    devices = list(jax.devices() if devices is None else devices)
    if n > len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {n} devices, "
            f"only {len(devices)} available"
        )
    # Auto axes: shardings come from the jitted functions' in/out specs (jax.make_mesh's
    # default, Explicit, would make every array's sharding part of its type).
    return jax.make_mesh(
        (data, fsdp, tensor),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=devices[:n],
    )


def logical_to_spec(
    shape: Sequence[int],
    axes: Sequence[Optional[str]],
    mesh: Mesh,
    rules: Mapping[str, AxisRule] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dims carry logical ``axes``."""
    used: set[str] = set()
    spec = []
    for size, name in zip(shape, axes, strict=True):
        target = rules.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(
            a for a in mesh_axes if a in mesh.shape and a not in used and mesh.shape[a] > 1
        )
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or size % n:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def logical_sharding(
    shape, axes, mesh: Mesh, rules: Mapping[str, AxisRule] = DEFAULT_RULES
) -> NamedSharding:
    """NamedSharding for one array with logical ``axes`` (e.g. ``("batch", "seq")``)."""
    return NamedSharding(mesh, logical_to_spec(shape, axes, mesh, rules))


def constrain(x, axes, mesh: Optional[Mesh], rules: Mapping[str, AxisRule] = DEFAULT_RULES):
    """``x`` with a sharding constraint from its logical ``axes`` (``x`` itself without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(x.shape, axes, mesh, rules))


def param_shardings(
    config: ModelConfig, mesh: Mesh, rules: Mapping[str, AxisRule] = DEFAULT_RULES
) -> dict:
    """Pytree of ``NamedSharding`` matching the params of ``config``."""
    return jax.tree.map(
        lambda sa: logical_sharding(sa[0], sa[1], mesh, rules),
        param_shapes_and_axes(config),
        is_leaf=_is_leaf,
    )
