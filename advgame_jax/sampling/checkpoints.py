"""Restore sampler weights from an Orbax checkpoint: the whole tree or one sub-tree of it.

Accepted ``checkpoint_path`` layouts (first match wins):

1. A PyTree item directory (it holds ``_METADATA``): what ``ocp.StandardCheckpointer().save``
   / ``StandardSave`` / ``PyTreeSave`` writes, e.g. a plain params pytree or the ``state``
   item of a ``CheckpointManager`` step.
2. A ``CheckpointManager`` step directory ``<root>/<step>`` whose ``item`` sub-directory
   (default ``"state"``, the Composite item name the game checkpointer uses) is such a dir.
3. A ``CheckpointManager`` root: its highest finished step (an integer-named directory).

``key_path`` selects the sub-tree holding the params, e.g. ``("defender", "ema_params")`` in
a game checkpoint ``{'attacker': PlayerState, 'defender': PlayerState, ...}``. Only that
sub-tree is read (Orbax partial restore), directly into the dtypes and shardings of ``like``
when given, so a sampler refresh never loads the optimizer state or the other player.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax

DEFAULT_ITEM = "state"


def resolve_item_dir(checkpoint_path: str, item: str = DEFAULT_ITEM) -> str:
    """The PyTree item directory for ``checkpoint_path`` (layouts in the module docstring)."""
    path = os.fspath(checkpoint_path)
    if not os.path.isdir(path):
        raise ValueError(
            f"checkpoint {path!r} is not a directory; expected an Orbax PyTree "
            f"checkpoint, a CheckpointManager step dir or its root"
        )
    if os.path.isfile(os.path.join(path, "_METADATA")):
        return path
    if os.path.isfile(os.path.join(path, item, "_METADATA")):
        return os.path.join(path, item)
    steps = sorted(
        (int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))),
        reverse=True,
    )
    for step in steps:
        step_dir = os.path.join(path, str(step))
        if os.path.isfile(os.path.join(step_dir, item, "_METADATA")):
            return os.path.join(step_dir, item)
    raise ValueError(
        f"checkpoint {path!r}: no Orbax PyTree found; expected '_METADATA' in it, in its "
        f"'{item}' sub-directory, or in '<step>/{item}' of a CheckpointManager root"
    )


def _child(tree, key, where):
    if isinstance(tree, dict):
        for k in (key, str(key)):
            if k in tree:
                return k, tree[k]
    elif isinstance(tree, (list, tuple)):
        try:
            return int(key), tree[int(key)]
        except (ValueError, IndexError):
            pass
    keys = sorted(map(str, tree)) if isinstance(tree, dict) else f"indices 0..{len(tree) - 1}"
    raise ValueError(f"checkpoint {where}: key {key!r} not found; available: {keys}")


def restore_params(
    checkpoint_path: str,
    *,
    key_path: Sequence[Any] = (),
    like: Any = None,
    item: str = DEFAULT_ITEM,
) -> Any:
    """Read the params pytree at ``key_path`` from an Orbax checkpoint.

    ``like``: optional pytree of arrays (or ``jax.ShapeDtypeStruct`` with shardings) whose
    structure, shapes, dtypes and shardings the restored params must take; without it the
    stored dtypes are kept and arrays land on the default device.
    """
    import orbax.checkpoint as ocp

    item_dir = resolve_item_dir(checkpoint_path, item)
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(item_dir)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    keys, sub = _select(meta, key_path, item_dir)
    where = f"{item_dir} at key path {tuple(keys)}"
    abstract = _stored_abstract(sub) if like is None else _abstract_like(sub, like, where)
    wrapped = abstract
    for k in reversed(keys):
        wrapped = {k: wrapped}
    restored = checkpointer.restore(
        item_dir,
        args=ocp.args.PyTreeRestore(
            item=wrapped,
            restore_args=ocp.checkpoint_utils.construct_restore_args(wrapped),
            partial_restore=bool(keys),
        ),
    )
    for k in keys:
        restored = restored[k]
    return restored


def _select(meta, key_path: Sequence[Any], item_dir: str):
    """``(the stored keys along key_path, the metadata sub-tree they reach)``."""
    sub = meta
    keys = []
    for key in key_path:
        k, sub = _child(sub, key, f"{item_dir} at {tuple(keys) + (key,)}")
        keys.append(k)
    return keys, sub


def _stored_abstract(sub):
    """The stored shapes and dtypes, on the default device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), sub
    )


def _abstract_like(sub, like, where: str):
    """``like``'s shapes, dtypes and shardings, after checking the stored tree matches it."""
    stored = jax.tree.structure(sub)
    if stored != jax.tree.structure(like):
        raise ValueError(
            f"checkpoint {where}: tree structure {stored} does not match the "
            f"model's params {jax.tree.structure(like)}"
        )

    def target(m, ref):
        if tuple(m.shape) != tuple(ref.shape):
            raise ValueError(
                f"checkpoint {where}: array {getattr(m, 'name', '?')} has "
                f"shape {tuple(m.shape)}, expected {tuple(ref.shape)}"
            )
        sharding = getattr(ref, "sharding", None) or jax.sharding.SingleDeviceSharding(
            jax.devices()[0]
        )
        return jax.ShapeDtypeStruct(tuple(ref.shape), ref.dtype, sharding=sharding)

    return jax.tree.map(target, sub, like)


def save_params(path: str, params: Any) -> str:
    """Save a params pytree as a plain Orbax PyTree checkpoint (layout 1); returns ``path``."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(os.fspath(path)), params, force=True)
    checkpointer.wait_until_finished()
    return path
