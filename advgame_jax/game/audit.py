"""Audit log of rollout trees: one JSON record per ``ScoredTree`` in a local JSONL file
created with mode 0600, and ``replay`` of a record through reward patching and pair selection.

The trees hold seed prompts, attacks and responses, which can be harmful text: the log is
written only to the given path (never printed) and its permissions are forced to owner
read/write even when the file already existed.

``replay`` re-derives the patched rewards from the logged final errors and raw judge rewards
(GAME_SPEC §2.9), checks them against the logged ones, and recomputes the preference pairs
and metrics; for a record written from a live tree it returns exactly what the live code
returned.
"""

from __future__ import annotations

from advgame_jax.errors import UserError
import dataclasses
import json
import os
from typing import Iterator

from advgame_jax.game.metrics import tree_metrics
from advgame_jax.game.rewards import attacker_pairs, defender_pairs, patch_x_reward, patch_y_reward
from advgame_jax.game.tree import ScoredTree, YError, scored_tree_from_dict, scored_tree_to_dict
from advgame_jax.types import TokenPair

AUDIT_VERSION = 1


class AuditLogError(UserError, ValueError):
    """An audit record is malformed or inconsistent."""


class AuditLog:
    """Append-only JSONL writer. ``write(scored, **meta)`` adds one line; ``meta`` (e.g. step,
    split) must be JSON-serialisable."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, scored: ScoredTree, **meta) -> None:
        record = {"version": AUDIT_VERSION, "meta": meta, "tree": scored_tree_to_dict(scored)}
        self._file.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_audit_log(path: str | os.PathLike) -> Iterator[dict]:
    """The records of an audit log, in order."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise AuditLogError(f"{path}:{lineno}: not a JSON record ({err.msg})") from None


def record_to_scored_tree(record: dict) -> ScoredTree:
    if not isinstance(record, dict) or record.get("version") != AUDIT_VERSION or "tree" not in record:
        raise AuditLogError(f"expected an audit record {{'version': {AUDIT_VERSION}, 'tree': ...}}")
    try:
        return scored_tree_from_dict(record["tree"])
    except (KeyError, TypeError, ValueError) as err:
        raise AuditLogError(f"malformed audit record: {type(err).__name__}: {err}") from None


def replay(record: dict) -> tuple[tuple[list[TokenPair], list[TokenPair]], dict[str, float]]:
    """((attacker_pairs, defender_pairs), metrics) of a logged tree, recomputed."""
    scored = record_to_scored_tree(record)
    cfg = scored.config
    att_on = cfg.attacker_judge_enabled and not scored.tree.skip_attacker

    def x_patched(b, a, error, raw):
        # The reference rule of score_tree: an attack whose selected response got
        # BAD_DEF_JUDGE was not sent to the attacker judge and keeps 0.0.
        d = scored.selected_d_BA[b][a]
        if (error is None and cfg.selection == "reference" and d is not None
                and scored.y_error_BAD[b][a][d] == YError.BAD_DEF_JUDGE):
            return 0.0
        try:
            return patch_x_reward(error, raw, att_on)
        except ValueError as err:
            raise AuditLogError(f"audit record: attack ({b}, {a}): {err}") from None

    x_reward = tuple(tuple(x_patched(b, a, e, r) for a, (e, r) in enumerate(zip(er, rr)))
                     for b, (er, rr) in enumerate(zip(scored.x_error_BA, scored.x_raw_reward_BA)))
    y_reward = tuple(tuple(tuple(patch_y_reward(e, r, cfg.defender_judge_enabled) for e, r in zip(er, rr))
                           for er, rr in zip(ers, rrs))
                     for ers, rrs in zip(scored.y_error_BAD, scored.y_raw_reward_BAD))
    if x_reward != scored.x_reward_BA or y_reward != scored.y_reward_BAD:
        raise AuditLogError("audit record: logged patched rewards differ from the ones its errors "
                            "and raw judge rewards give")
    scored = dataclasses.replace(scored, x_reward_BA=x_reward, y_reward_BAD=y_reward)
    return (attacker_pairs(scored), defender_pairs(scored)), tree_metrics(scored)
