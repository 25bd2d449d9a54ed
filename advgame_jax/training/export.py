"""Export of a player's trained or EMA params to a Hugging Face directory (``save_hf``).

The trained attacker is a controlled red-teaming artifact (GAME_SPEC, "Beyond the
reference"): exporting it needs ``allow_attacker_export=True``, and the exported directory
carries a marker file (``ADVGAME_CONTROLLED_ARTIFACT.json``) and a ``config.json`` field
(``advgame_controlled_artifact``) so that serving or red-team tools can recognise it.
"""

from __future__ import annotations

from advgame_jax.errors import UserError
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp

from advgame_jax.models import ModelConfig, save_hf

MARKER_FILE = "ADVGAME_CONTROLLED_ARTIFACT.json"
CONFIG_FIELD = "advgame_controlled_artifact"
NOTICE = ("Attacker model trained by the AdvGame attacker-defender safety game. It is built to "
          "produce jailbreak attempts and is a controlled red-teaming artifact: keep it inside "
          "authorised red-teaming and safety-evaluation work; do not deploy it as an assistant.")


class AttackerExportError(UserError, PermissionError):
    """Exporting attacker params without ``allow_attacker_export=True``."""


def export_hf(path, config: ModelConfig, params, *, attacker: bool = False,
              allow_attacker_export: bool = False, dtype: Optional[str] = None) -> str:
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
            f"controlled red-teaming artifact; pass allow_attacker_export=True to export it")
    if not attacker and is_controlled_artifact(path):
        raise ValueError(f"{path} holds an exported attacker ({MARKER_FILE}); refusing to "
                         f"overwrite it with non-attacker params: choose another directory")
    if dtype is not None:
        params = jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.dtype(dtype)), params)
    if jax.process_index() != 0:
        return path
    save_hf(path, config, params)
    cfg_path = os.path.join(path, "config.json")
    if attacker:
        with open(os.path.join(path, MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump({"role": "attacker", "controlled_red_teaming_artifact": True,
                       "notice": NOTICE}, f, indent=2)
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg[CONFIG_FIELD] = "attacker"
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
    return path


def is_controlled_artifact(path) -> bool:
    """True when ``path`` is an exported attacker (marker file or config field)."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, MARKER_FILE)):
        return True
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return bool(json.load(f).get(CONFIG_FIELD))
    except (OSError, ValueError):
        return False
