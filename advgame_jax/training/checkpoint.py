"""Orbax checkpoints of the whole game state, with a recovery path for damaged checkpoints.

Layout of ``directory``::

    <step>/                      one committed checkpoint per saved step (Orbax)
      state/                     StandardSave of the state pytree, e.g.
                                 {'attacker': PlayerState, 'defender': PlayerState, 'rng': key}
      meta/metadata              JsonSave: data-iterator positions, config JSON, anything small
      advgame_manifest.json      every file of the step with its size (and crc32 if enabled),
                                 written once Orbax has committed the step
    <step>.orbax-checkpoint-tmp-*  a save in flight: Orbax writes here and renames on commit,
                                 so a crash mid-save never yields a half-written latest step
                                 (such leftovers are ignored and cleaned up at start)
    quarantine/<step>-<n>/       damaged checkpoints moved aside by ``restore``

``restore`` walks the committed steps from the newest down, checks each against its manifest
(missing, truncated or, with checksums, altered files) and tries to load it; a damaged one is
reported with ``logging.warning``, moved to ``quarantine/`` (so a later save of that step is
possible) and the previous step is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

MANIFEST = "advgame_manifest.json"
QUARANTINE = "quarantine"


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored."""


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
    """Record every file of a committed step with its size (and crc32)."""
    entries = {}
    for rel in _list_files(step_dir):
        path = os.path.join(step_dir, rel)
        entries[rel] = {"size": os.path.getsize(path)}
        if checksums:
            entries[rel]["crc32"] = _crc32(path)
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"files": entries}, f, indent=0, sort_keys=True)
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


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


class GameCheckpointer:
    """Periodic, asynchronous Orbax checkpoints of the game state plus JSON metadata.

    ``save_every``: save when ``step % save_every == 0`` (or ``force=True``). ``keep``: number
    of most recent checkpoints kept. ``async_save``: device→host copy happens inside
    ``save`` (the state may be donated right after), file writing in the background.
    ``checksums``: also record and check a crc32 per file (reads every byte once per save).
    """

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True,
                 checksums: bool = False):
        if save_every < 1:
            raise ValueError(f"train.checkpoint_every must be ≥ 1, got {save_every!r}")
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be ≥ 1, got {keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.checksums = checksums
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))
        self._pending: list[int] = []

    # ---------------------------------------------------------------- saving
    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON-serialisable) at ``step``
        if due; returns whether a save started. Waits for the previous save first."""
        if not (force or self.should_save(step)):
            return False
        try:
            json.dumps(meta)
        except TypeError as e:
            raise ValueError(f"checkpoint meta must be JSON-serialisable: {e}") from None
        self.wait()
        if step in self._mgr.all_steps():
            logging.warning("checkpoint step %d already exists in %s; not overwritten",
                            step, self.directory)
            return False
        saved = self._mgr.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        if saved:
            self._pending.append(step)
        return saved

    def wait(self) -> None:
        """Block until every started save is committed (and its manifest written)."""
        self._mgr.wait_until_finished()
        if self._pending and jax.process_index() == 0:
            for step in self._pending:
                step_dir = os.path.join(self.directory, str(step))
                if os.path.isdir(step_dir):  # may already be garbage-collected by `keep`
                    write_manifest(step_dir, checksums=self.checksums)
        self._pending = []

    def close(self) -> None:
        self.wait()
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------- restoring
    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (in-flight tmp directories are not listed)."""
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, abstract_state: Any, step: Optional[int] = None):
        """Load ``(step, state, meta)`` from the newest usable checkpoint (or exactly ``step``).

        ``abstract_state``: the state's structure as ``jax.ShapeDtypeStruct`` leaves (with
        ``sharding=`` to restore onto a mesh; see ``state.abstract_player_state``). Returns
        None when the directory holds no checkpoint. A damaged checkpoint is skipped with a
        warning; if none can be read, raises :class:`CheckpointError`.
        """
        self.wait()
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                      f"(have {steps})")
            steps = [step]
        if not steps:
            return None
        errors = []
        for s in reversed(steps):
            step_dir = os.path.join(self.directory, str(s))
            problem = verify_manifest(step_dir)
            if problem is None:
                try:
                    out = self._mgr.restore(s, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        meta=ocp.args.JsonRestore()))
                    return s, out["state"], out["meta"]
                except Exception as e:  # noqa: BLE001 - any read failure means "damaged"
                    problem = f"{type(e).__name__}: {str(e)[:500]}"
            errors.append(f"step {s}: {problem}")
            logging.warning("checkpoint %s is damaged (%s); falling back to an earlier one",
                            step_dir, problem)
            self._quarantine(s)
        raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(errors))

    def _quarantine(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        src = os.path.join(self.directory, str(step))
        qdir = os.path.join(self.directory, QUARANTINE)
        os.makedirs(qdir, exist_ok=True)
        n = 0
        while os.path.exists(os.path.join(qdir, f"{step}-{n}")):
            n += 1
        shutil.move(src, os.path.join(qdir, f"{step}-{n}"))
        self._mgr.reload()
