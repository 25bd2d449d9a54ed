"""The trained attacker is a controlled artifact: the one marker it carries and the one gate
every tool checks (GAME_SPEC, "Beyond the reference").

Every artifact the project writes from attacker weights carries the marker in several places,
so that renaming the directory, copying it, or replacing/editing one of its files (e.g. a
base model's ``config.json`` copied over the exported one) does not drop it:

* the marker file ``ADVGAME_CONTROLLED_ARTIFACT.json`` in the artifact directory, and in its
  ``params/`` sub-directory when it holds Orbax params (sync versions, converted params);
* the ``config.json`` field ``advgame_controlled_artifact`` (HF exports, converted params);
* the ``__metadata__`` field of the same name in every safetensors header (HF exports): the
  weights themselves say what they are;
* ``COMMITTED.json`` of a sync version (``role``/``controlled_artifact``) and the
  ``CONTROLLED_ARTIFACT`` file of the sync root.

:func:`is_attacker_artifact` recognises any of them (and the older marker names);
:func:`require_attacker_allowed` is the gate that convert, serve, eval and red-team call
before reading weights. Files holding attacker weights are private (:func:`make_private`:
directories 0700, files 0600, whatever the umask).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Optional

from advgame_jax.errors import UserError

MARKER_FILE = "ADVGAME_CONTROLLED_ARTIFACT.json"
CONFIG_FIELD = "advgame_controlled_artifact"
NOTICE = (
    "Attacker model trained by the AdvGame attacker-defender safety game. It is built to "
    "produce jailbreak attempts and is a controlled red-teaming artifact: keep it inside "
    "authorised red-teaming and safety-evaluation work; do not deploy it as an assistant."
)
# Marker files of every version of the project (sync roots, serve's own, exports).
MARKER_FILES = (MARKER_FILE, "ADVGAME_ATTACKER", "CONTROLLED_ARTIFACT")
SAFETENSORS_METADATA = {CONFIG_FIELD: "attacker"}


class AttackerNotAllowed(UserError, PermissionError):
    """Trained-attacker weights used without the explicit acknowledgement flag."""


def _json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def _safetensors_marked(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 * 2**20:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and bool(meta.get(CONFIG_FIELD))


def attacker_evidence(path: str) -> Optional[str]:
    """What marks ``path`` (a directory, or a file inside one) as holding attacker weights, or
    None when nothing does."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        return None
    d = path if os.path.isdir(path) else os.path.dirname(path)
    for where in (d, os.path.join(d, "params"), os.path.dirname(d)):
        for name in MARKER_FILES:
            if os.path.isfile(os.path.join(where, name)):
                if where == os.path.dirname(d) and not os.path.isfile(
                    os.path.join(d, "COMMITTED.json")
                ):
                    continue  # a parent's marker counts for a sync version inside it only
                return f"marker file {os.path.join(where, name)}"
    cfg = _json(os.path.join(d, "config.json"))
    if isinstance(cfg, dict) and (
        cfg.get(CONFIG_FIELD) or str(cfg.get("advgame_role", "")).lower() == "attacker"
    ):
        return f"{os.path.join(d, 'config.json')} field {CONFIG_FIELD}"
    commit = _json(os.path.join(d, "COMMITTED.json"))
    if isinstance(commit, dict) and (
        commit.get("controlled_artifact") or commit.get("role") == "attacker"
    ):
        return f"sync version {os.path.join(d, 'COMMITTED.json')} (role attacker)"
    files = (
        [path]
        if path.endswith(".safetensors")
        else sorted(glob.glob(os.path.join(d, "*.safetensors")))
    )
    for fn in files:
        if _safetensors_marked(fn):
            return f"safetensors header of {fn}"
    return None


def is_attacker_artifact(path: str) -> bool:
    """True when ``path`` holds weights of the trained attacker (any marker above)."""
    return attacker_evidence(path) is not None


def require_attacker_allowed(
    path: str,
    allow: bool,
    what: str,
    *,
    attacker: Optional[bool] = None,
    error: type = AttackerNotAllowed,
) -> bool:
    """The gate: raise ``error`` (an :class:`AttackerNotAllowed` by default) when ``path``
    holds attacker weights and ``allow`` is False. ``what``: the flag or action named in the
    message (``--model_dir``, ``--params_dir`` ...). ``attacker``: already known (e.g.
    ``--player=attacker`` of a game checkpoint) instead of read from the markers. Returns
    whether ``path`` is an attacker artifact."""
    evidence = (
        ("--player=attacker" if attacker else None)
        if attacker is not None
        else attacker_evidence(path)
    )
    if evidence is not None and not allow:
        raise error(
            f"{what} {os.fspath(path)!r} holds the trained attacker, a controlled "
            f"red-teaming artifact ({evidence}); pass --allow_attacker to use it"
        )
    return evidence is not None


def write_marker(directory: str, *, params_subdir: bool = False) -> None:
    """Write the marker file into ``directory`` (and its ``params/`` when asked)."""
    text = (
        json.dumps(
            {"role": "attacker", "controlled_red_teaming_artifact": True, "notice": NOTICE},
            indent=2,
        )
        + "\n"
    )
    targets = [directory] + ([os.path.join(directory, "params")] if params_subdir else [])
    for d in targets:
        fd = os.open(os.path.join(d, MARKER_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)


def mark_config(config_path: str) -> None:
    """Add the ``config.json`` field (file rewritten in place, mode 0600)."""
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg[CONFIG_FIELD] = "attacker"
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def make_private(path: str) -> None:
    """Directories 0700 and files 0600 under ``path`` (itself included)."""
    if os.path.isfile(path):
        os.chmod(path, 0o600)
        return
    os.chmod(path, 0o700)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)
