"""Files and directories the project creates: proof of ownership, atomic builds and writes.

The project deletes only what it created and can prove it created. A directory it creates
for a derived artefact (the toy world, a sampler sync directory, a build in progress) holds a
marker file written at creation, naming the artefact's ``kind``; :func:`remove_owned` refuses
any directory without the marker of that kind, whatever it holds, so a user path given by
mistake (``.``, ``$HOME``, a folder of their files) is never touched.

Derived directories are built aside and renamed into place (:func:`build_dir_atomically`): a
crash mid-build leaves the previous artefact (or nothing) at the final path, never a half-built
one. Files are written the same way (:func:`atomic_write_text`, :func:`atomic_write_bytes`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Callable

from advgame_jax.errors import UserError

MARKER = ".advgame_jax_owned.json"
_TMP_INFIX = ".tmp-"
_OLD_INFIX = ".old-"


class NotOwnedError(UserError, RuntimeError):
    """A path the project was asked to replace or delete was not created by it."""


def write_marker(path: str, kind: str) -> None:
    """Mark the existing directory ``path`` as created by the project for artefact ``kind``."""
    atomic_write_text(
        os.path.join(path, MARKER), json.dumps({"created_by": "advgame_jax", "kind": kind}) + "\n"
    )


def make_owned_dir(path: str, kind: str) -> str:
    """Create ``path`` (parents as needed) and mark it; an existing directory must already be
    owned for ``kind`` (else :class:`NotOwnedError`). Returns ``path``."""
    if os.path.lexists(path):
        if not is_owned(path, kind):
            raise NotOwnedError(_refusal(path, kind, "use"))
        return path
    os.makedirs(path)
    write_marker(path, kind)
    return path


def is_owned(path: str, kind: str) -> bool:
    """True when ``path`` is a real directory (not a link) holding this project's marker for
    ``kind``."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("created_by") == "advgame_jax"
        and meta.get("kind") == kind
    )


def _refusal(path: str, kind: str, verb: str) -> str:
    return (
        f"refusing to {verb} {path!r}: it exists but was not created by advgame_jax as a "
        f"{kind!r} directory (no {MARKER} marker of that kind). Choose another path or move "
        f"it away yourself."
    )


def remove_owned(path: str, kind: str) -> bool:
    """Delete the directory ``path`` if the project created it for ``kind``. Returns False when
    nothing is there; raises :class:`NotOwnedError` (deleting nothing) when something is there
    without the marker."""
    if not os.path.lexists(path):
        return False
    if not is_owned(path, kind):
        raise NotOwnedError(_refusal(path, kind, "delete"))
    shutil.rmtree(path)
    return True


def remove_stale_builds(final: str, kind: str) -> int:
    """Delete siblings ``<final>.tmp-*`` / ``<final>.old-*`` left by an interrupted
    :func:`build_dir_atomically`, only those owned for ``kind``. Returns how many."""
    parent, base = os.path.split(os.path.abspath(final))
    n = 0
    if not os.path.isdir(parent):
        return 0
    for name in os.listdir(parent):
        if name.startswith(base + _TMP_INFIX) or name.startswith(base + _OLD_INFIX):
            p = os.path.join(parent, name)
            if is_owned(p, kind):
                shutil.rmtree(p)
                n += 1
    return n


def build_dir_atomically(final: str, kind: str, build: Callable[[str], None]) -> str:
    """Build a derived directory aside and rename it into place.

    ``build(tmp)`` fills ``tmp``, a fresh owned sibling of ``final``. If ``final`` exists it
    must be owned for ``kind`` (checked BEFORE building; else :class:`NotOwnedError`); it is
    replaced only after the build succeeded. A failed build removes its own ``tmp`` and leaves
    ``final`` as it was. Returns ``final``.
    """
    final = os.path.abspath(final)
    if os.path.lexists(final) and not is_owned(final, kind):
        raise NotOwnedError(_refusal(final, kind, "replace"))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    remove_stale_builds(final, kind)
    tmp = f"{final}{_TMP_INFIX}{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    write_marker(tmp, kind)
    try:
        build(tmp)
        write_marker(tmp, kind)  # the build may have cleared the folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(final):
        old = f"{final}{_OLD_INFIX}{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_write_bytes(path: str, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary sibling and ``os.replace``: readers
    see the old content or the new, never a torn file. ``mode`` is applied before the rename."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + _TMP_INFIX, dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str, *, mode: int = 0o644) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def check_writable_dir(path: str, field: str) -> None:
    """Create ``path`` if needed and prove it writable with a probe file; raise one
    ``OSError`` naming the config ``field`` otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(
            f"{field}={path!r} is not a writable directory ({e.strerror or e}); "
            f"give a directory this user can write to"
        ) from e


# ---------------------------------------------------------------- files the project created
# A file the project creates inside a directory it does not own (``metrics.jsonl`` in a
# workdir the user chose) is recorded in that directory's ``FILES_MARKER`` when it is
# created; the project rewrites or truncates such a file only when it is recorded there.
FILES_MARKER = ".advgame_jax_files.json"


def _files_record(directory: str) -> dict:
    try:
        with open(os.path.join(directory, FILES_MARKER), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict) or meta.get("created_by") != "advgame_jax":
        return {}
    files = meta.get("files")
    return files if isinstance(files, dict) else {}


def is_owned_file(path: str, kind: str) -> bool:
    """True when the regular file ``path`` was created by the project as a ``kind`` file."""
    path = os.path.abspath(path)
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    return _files_record(os.path.dirname(path)).get(os.path.basename(path)) == kind


def create_owned_file(path: str, kind: str, *, mode: int = 0o600) -> None:
    """Create the empty file ``path`` (it must not exist) and record it as the project's."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.close(fd)
    files = dict(_files_record(directory))
    files[os.path.basename(path)] = kind
    atomic_write_text(
        os.path.join(directory, FILES_MARKER),
        json.dumps({"created_by": "advgame_jax", "files": files}) + "\n",
        mode=0o600,
    )


def require_owned_file(path: str, kind: str, field: str) -> bool:
    """Create ``path`` as the project's ``kind`` file if it is absent (returns False), or
    check that an existing one is the project's (returns True); a file the project did not
    create raises :class:`NotOwnedError` and is left as it is."""
    if not os.path.lexists(path):
        create_owned_file(path, kind)
        return False
    if not is_owned_file(path, kind):
        raise NotOwnedError(
            f"{field}: {path!r} exists but was not written by advgame_jax (it is not recorded "
            f"in {FILES_MARKER}); it is left untouched. Move it away or use another directory."
        )
    return True
