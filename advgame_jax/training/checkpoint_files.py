"""The files of a game checkpoint step: its manifest (sizes, crc32), its modes, and the
proof that a step directory, or the checkpoints directory itself, was written by this project.

A committed step holds the attacker's weights (a controlled artifact): :func:`make_private`
gives it modes 0700/0600 whatever the umask. :func:`write_manifest` records every file's size
(and crc32) and marks the step as the project's; :func:`claim_directory` refuses a
checkpoints directory holding a step directory the project did not write.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Optional

from advgame_jax import fsutil
from advgame_jax.controlled import make_private  # noqa: F401 (re-exported)

MANIFEST = "advgame_manifest.json"
QUARANTINE = "quarantine"


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _list_files(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str, *, checksums: bool = False) -> None:
    """Record every file of a committed step with its size (and crc32); the manifest also
    marks the step as written by this project."""
    entries = {}
    for rel in _list_files(step_dir):
        path = os.path.join(step_dir, rel)
        entries[rel] = {"size": os.path.getsize(path)}
        if checksums:
            entries[rel]["crc32"] = _crc32(path)
    fsutil.atomic_write_text(
        os.path.join(step_dir, MANIFEST),
        json.dumps({"created_by": "advgame_jax", "files": entries}, indent=0, sort_keys=True),
        mode=0o600,
    )


def is_project_step(step_dir: str) -> bool:
    """True when ``step_dir`` was written by this project's checkpointer: its manifest says
    so, or (a step committed just before a crash, manifest not yet written) its metadata item
    holds the fields ``experiment.loop`` saves."""
    if os.path.islink(step_dir) or not os.path.isdir(step_dir):
        return False
    try:
        with open(os.path.join(step_dir, MANIFEST), encoding="utf-8") as f:
            if json.load(f).get("created_by") == "advgame_jax":
                return True
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with open(os.path.join(step_dir, "meta", "metadata"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "config" in meta


def claim_directory(directory: str) -> None:
    """Create ``directory`` (mode 0700: every step in it holds the attacker), or check that an
    existing one holds only step directories this project wrote (:func:`is_project_step`;
    Orbax reads, replaces and garbage-collects integer-named directories, so a foreign one
    must never be there). Anything else raises ``fsutil.NotOwnedError`` and nothing is
    moved, renamed or deleted. Other names (Orbax's in-flight ``*.orbax-checkpoint-tmp-*``,
    ``quarantine/``) are not steps and are left to their owners."""
    if not os.path.lexists(directory):
        os.makedirs(directory, mode=0o700)
        os.chmod(directory, 0o700)
        return
    if os.path.islink(directory) or not os.path.isdir(directory):
        raise fsutil.NotOwnedError(
            f"{directory!r} exists and is not a checkpoints directory "
            f"of advgame_jax; move it away or use another workdir"
        )
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        if name.isdigit() and not is_project_step(full):
            raise fsutil.NotOwnedError(
                f"{full!r} was not written by advgame_jax (no {MANIFEST} and no checkpoint "
                f"metadata of this project); nothing was moved or changed. Move it out of "
                f"{directory!r} or use another workdir"
            )


def disk_full(err: Optional[BaseException]) -> bool:
    """True when ``err`` (or an exception it was raised from) is ENOSPC."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) == 28 or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def verify_manifest(step_dir: str) -> Optional[str]:
    """None if the step matches its manifest (or has none yet), else what is wrong."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable manifest {path}: {e}"
    for rel, want in entries.items():
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return f"missing file {rel}"
        size = os.path.getsize(full)
        if size != want["size"]:
            return f"file {rel} has {size} bytes, expected {want['size']}"
        if "crc32" in want and _crc32(full) != want["crc32"]:
            return f"file {rel} fails its crc32 check"
    return None
