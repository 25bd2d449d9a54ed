"""Export of a player's trained or EMA params to a Hugging Face directory (``save_hf``).

The trained attacker is a controlled red-teaming artifact (GAME_SPEC, "Beyond the
reference"): exporting it needs ``allow_attacker_export=True``, and the exported directory
carries every marker of ``advgame_jax.controlled`` (marker file, ``config.json`` field,
safetensors header field) and is private (0700/0600), so that every tool recognises it.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp

from advgame_jax import controlled
from advgame_jax.controlled import CONFIG_FIELD, MARKER_FILE, NOTICE  # noqa: F401 (re-exported)
from advgame_jax.models import ModelConfig, save_hf


class AttackerExportError(controlled.AttackerNotAllowed):
    """Exporting attacker params without ``allow_attacker_export=True``."""


def export_hf(
    path,
    config: ModelConfig,
    params,
    *,
    attacker: bool = False,
    allow_attacker_export: bool = False,
    dtype: Optional[str] = None,
) -> str:
    """Write ``params`` as an HF checkpoint directory at ``path`` and return the path.

    ``params``: θ or θ̄ of a player (e.g. ``state.ema_params``), sharded or not.
    ``attacker=True`` requires ``allow_attacker_export=True`` (else
    :class:`AttackerExportError`) and marks the directory. ``dtype``: e.g. 'bfloat16' to
    store in a serving dtype (default: the params' dtype).
    """
    path = os.fspath(path)
    if attacker and not allow_attacker_export:
        raise AttackerExportError(
            f"refusing to export attacker params to {path}: the trained attacker is a "
            f"controlled red-teaming artifact; pass allow_attacker_export=True to export it"
        )
    if not attacker and is_controlled_artifact(path):
        raise ValueError(
            f"{path} holds an exported attacker ({MARKER_FILE}); refusing to "
            f"overwrite it with non-attacker params: choose another directory"
        )
    if dtype is not None:
        params = jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.dtype(dtype)), params)
    if jax.process_index() != 0:
        return path
    if attacker:  # private before the first weight is written
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    save_hf(path, config, params, metadata=controlled.SAFETENSORS_METADATA if attacker else None)
    if attacker:
        controlled.write_marker(path)
        controlled.mark_config(os.path.join(path, "config.json"))
        controlled.make_private(path)
    return path


def is_controlled_artifact(path) -> bool:
    """True when ``path`` holds attacker weights (``controlled.is_attacker_artifact``)."""
    return controlled.is_attacker_artifact(os.fspath(path))
