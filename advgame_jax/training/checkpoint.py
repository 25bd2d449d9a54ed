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

``restore`` walks the committed steps from the newest down and tells two failures apart:

* **damaged** — a file is missing, truncated or altered (crc32 per file, on by default, so a
  same-size corruption is caught too), or Orbax cannot read it: the step is reported with
  ``logging.warning``, moved to ``quarantine/`` (so a later save of that step is possible) and
  the previous step is used;
* **incompatible** — the checkpoint is intact but was written for another state structure
  (shapes, tree) or, through ``check_meta``, another experiment config:
  :class:`CheckpointIncompatibleError` names the differing fields and NOTHING is moved or
  deleted, so rerunning with the original config resumes as before.

A failed background save is raised by the next call into the checkpointer (``poll`` runs
after every step, so that is the step that caused it), never swallowed until a later save.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from advgame_jax.errors import UserError
from advgame_jax.training.checkpoint_files import (  # noqa: F401 (re-exported)
    MANIFEST,
    QUARANTINE,
    claim_directory,
    disk_full,
    is_project_step,
    make_private,
    verify_manifest,
    write_manifest,
)


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint could be restored, or a save failed."""


class CheckpointIncompatibleError(CheckpointError):
    """An intact checkpoint that does not belong to this config / state structure."""


def _path_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def tree_signature(tree) -> dict[str, Optional[tuple]]:
    """``{"attacker/params/embed": shape, ...}`` for array-like leaves (``.shape``), with the
    shape None for typed PRNG keys (stored as raw key data); paths use names only, so a
    dataclass field and a dict key of the same name agree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        extended = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.extended)
        out[_path_name(path)] = None if extended else tuple(getattr(leaf, "shape", ()))
    return out


def structure_differences(saved, wanted) -> list[str]:
    """Human-readable differences between a checkpoint's tree metadata and the wanted state."""
    a, b = tree_signature(saved), tree_signature(wanted)
    diffs = [f"{k}: in the checkpoint only" for k in sorted(set(a) - set(b))]
    diffs += [f"{k}: missing from the checkpoint" for k in sorted(set(b) - set(a))]
    diffs += [
        f"{k}: shape {a[k]} in the checkpoint, {b[k]} now"
        for k in sorted(set(a) & set(b))
        if a[k] is not None and b[k] is not None and a[k] != b[k]
    ]
    return diffs


_ABSENT = "<absent>"


def config_differences(
    saved: Any,
    current: Any,
    *,
    ignore: tuple[str, ...] = (),
    added: Optional[dict] = None,
    prefix: str = "config",
) -> list[str]:
    """Dotted fields whose values differ between two JSON-like configs, e.g.
    ``"config.loss.beta: 0.1 in the checkpoint, 0.2 now"``. ``ignore``: dotted fields (or
    subtrees) that may change between runs (relative to ``prefix``). ``added``: fields newer
    than the checkpoint format, each with the value that reproduces the older behaviour; a
    checkpoint without the field matches when the field holds that value now."""
    rel = prefix.partition(".")[2]
    if rel and any(rel == i or rel.startswith(i + ".") for i in ignore):
        return []
    if saved == _ABSENT and added and rel in added:
        saved = added[rel]
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            out += config_differences(
                saved.get(k, _ABSENT),
                current.get(k, _ABSENT),
                ignore=ignore,
                added=added,
                prefix=f"{prefix}.{k}",
            )
        return out
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - JSON has no tuples
    if norm(saved) != norm(current):
        return [f"{prefix}: {saved!r} in the checkpoint, {current!r} now"]
    return []


class GameCheckpointer:
    """Periodic, asynchronous Orbax checkpoints of the game state plus JSON metadata.

    ``save_every``: save when ``step % save_every == 0`` (or ``force=True``). ``keep``: number
    of most recent checkpoints kept. ``async_save``: device→host copy happens inside
    ``save`` (the state may be donated right after), file writing in the background.
    ``checksums``: also record and check a crc32 per file (on by default, so a same-size
    corruption is detected as damage). The checksums of a committed step are computed by a
    background thread (``zlib.crc32`` and file reads release the GIL), never on the training
    thread; a step whose manifest is not written yet is still resumable (its sizes and
    checksums are then not checked).

    The directory is the checkpointer's own (:func:`claim_directory`): created 0700, and a
    step directory this project did not write is refused, never quarantined.
    """

    def __init__(
        self,
        directory: str,
        *,
        save_every: int,
        keep: int,
        async_save: bool = True,
        checksums: bool = True,
    ):
        if save_every < 1:
            raise ValueError(f"train.checkpoint_every must be ≥ 1, got {save_every!r}")
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be ≥ 1, got {keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.checksums = checksums
        if jax.process_index() == 0:
            claim_directory(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._pending: list[int] = []
        self._finisher = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="advgame-manifest"
        )
        self._finishing: list[tuple[int, concurrent.futures.Future]] = []

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
        self.wait(finish=False)
        if step in self._mgr.all_steps():
            logging.warning(
                "checkpoint step %d already exists in %s; not overwritten", step, self.directory
            )
            return False
        saved = self._mgr.save(
            step,
            force=True,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        if saved:
            self._pending.append(step)
        return saved

    def poll(self) -> None:
        """If the background save has finished, complete it now (its manifest is written in
        the background), raising :class:`CheckpointError` if it failed; never waits for a
        save still in flight."""
        if self._pending and not self._mgr.is_saving_in_progress():
            self.wait(finish=False)
        self._collect(block=False)

    def _save_failed(self, e: BaseException) -> CheckpointError:
        steps = ", ".join(map(str, self._pending)) or "?"
        self._pending = []
        logging.error(
            "saving checkpoint step %s failed", steps, exc_info=e, extra={"advgame_file_only": True}
        )  # the traceback: log file only
        cause = "no space left on device; " if disk_full(e) else ""
        return CheckpointError(
            f"saving the checkpoint of step {steps} in {self.directory} "
            f"failed: {cause}{type(e).__name__}: {str(e)[:300]}. Rerun the "
            f"same command to resume from the last complete checkpoint"
        )

    def _finish_step(self, step: int) -> None:
        """Modes and manifest of a committed step (runs on the finisher thread)."""
        step_dir = os.path.join(self.directory, str(step))
        try:
            make_private(step_dir)
            write_manifest(step_dir, checksums=self.checksums)
        except FileNotFoundError:
            if os.path.isdir(step_dir):
                raise
            # already garbage-collected by `keep`: nothing to record

    def _collect(self, *, block: bool) -> None:
        left = []
        for step, fut in self._finishing:
            if block or fut.done():
                try:
                    fut.result()
                except Exception as e:  # noqa: BLE001 - whatever writing the manifest raised
                    self._pending = [step]
                    self._finishing = []
                    raise self._save_failed(e) from e
            else:
                left.append((step, fut))
        self._finishing = left

    def wait(self, *, finish: bool = True) -> None:
        """Block until every started save is committed (and, with ``finish``, its manifest
        written); raises :class:`CheckpointError` if one failed."""
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - whatever the writer raised
            raise self._save_failed(e) from e
        if self._pending and jax.process_index() == 0:
            for step in self._pending:
                self._finishing.append((step, self._finisher.submit(self._finish_step, step)))
        self._pending = []
        if finish:
            self._collect(block=True)

    def close(self) -> None:
        try:
            self.wait()
        except BaseException:
            try:  # the first failure is the one reported; Orbax may raise it again here
                self._mgr.close()
            except Exception:  # noqa: BLE001
                logging.debug(
                    "closing the checkpoint manager after a failed save",
                    exc_info=True,
                    extra={"advgame_file_only": True},
                )
            self._finisher.shutdown(wait=True)
            raise
        self._mgr.close()
        self._finisher.shutdown(wait=True)

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

    def restore(
        self,
        abstract_state: Any,
        step: Optional[int] = None,
        *,
        check_meta: Optional[Callable[[dict], list[str]]] = None,
    ):
        """Load ``(step, state, meta)`` from the newest usable checkpoint (or exactly ``step``).

        ``abstract_state``: the state's structure as ``jax.ShapeDtypeStruct`` leaves (with
        ``sharding=`` to restore onto a mesh; see ``state.abstract_player_state``).
        ``check_meta(meta)``: the reasons (e.g. differing config fields) why a checkpoint with
        this metadata does not belong to the current run; empty when it does. Returns None
        when the directory holds no checkpoint. A damaged checkpoint is quarantined and
        skipped with a warning; an incompatible one raises
        :class:`CheckpointIncompatibleError` without touching anything; if no checkpoint can
        be read, raises :class:`CheckpointError`.
        """
        self.wait()
        steps = self._candidate_steps(step)
        if not steps:
            return None
        errors = []
        for s in reversed(steps):
            restored, problem = self._try_restore(s, abstract_state, check_meta)
            if restored is not None:
                return restored
            step_dir = os.path.join(self.directory, str(s))
            errors.append(f"step {s}: {problem}")
            logging.warning(
                "checkpoint %s is damaged (%s); falling back to an earlier one", step_dir, problem
            )
            self._quarantine(s)
        raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(errors))

    def _candidate_steps(self, step: Optional[int]) -> list[int]:
        """Committed steps to try, oldest first: all of them, or exactly ``step``."""
        steps = self.all_steps()
        if step is None:
            return steps
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory} (have {steps})"
            )
        return [step]

    def _try_restore(self, s: int, abstract_state: Any, check_meta):
        """``((s, state, meta), None)`` when step ``s`` reads back, ``(None, problem)`` when it
        is damaged; raises :class:`CheckpointIncompatibleError` when it belongs to another run."""
        step_dir = os.path.join(self.directory, str(s))
        problem = verify_manifest(step_dir)
        meta = saved_tree = None
        if problem is None:
            problem, meta, saved_tree = self._read_small(s)
        if problem is not None or meta is None or saved_tree is None:
            return None, problem
        reasons = structure_differences(saved_tree, abstract_state)
        if not reasons and check_meta is not None:
            reasons = list(check_meta(meta))
        if reasons:
            shown = "; ".join(reasons[:12]) + (
                f"; … {len(reasons) - 12} more" if len(reasons) > 12 else ""
            )
            raise CheckpointIncompatibleError(
                f"the checkpoint at {step_dir} was written by a run with another "
                f"config, so it is not resumed (nothing was changed): {shown}. Rerun "
                f"with the original settings to resume, or use a new workdir."
            )
        try:
            out = self._mgr.restore(
                s,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            return (s, out["state"], out["meta"]), None
        except Exception as e:  # noqa: BLE001 - structure matched: a read failure is damage
            return None, f"{type(e).__name__}: {str(e)[:500]}"

    def _read_small(self, step: int):
        """``(problem, meta, state tree metadata)`` of a step; ``problem`` is None when both
        could be read."""
        try:
            meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
            tree = self._mgr.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - unreadable metadata means "damaged"
            return f"unreadable metadata: {type(e).__name__}: {str(e)[:300]}", None, None
        if not isinstance(meta, dict) or tree is None:
            return "missing metadata", None, None
        return None, meta, tree

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
