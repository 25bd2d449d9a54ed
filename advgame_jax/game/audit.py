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

import json
import os
from typing import Iterator

from advgame_jax.codec import from_plain, to_plain
from advgame_jax.errors import UserError
from advgame_jax.game.metrics import tree_metrics
from advgame_jax.game.rewards import attack_reward, pairs, patch_reward
from advgame_jax.game.tree import ScoredTree
from advgame_jax.types import TokenPair

# 2: the tree is the slot records (``codec.to_plain`` of a ``ScoredTree``); 1 held one
# nested list per field.
AUDIT_VERSION = 2


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
        record = {"version": AUDIT_VERSION, "meta": meta, "tree": to_plain(scored)}
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
    if (
        not isinstance(record, dict)
        or record.get("version") != AUDIT_VERSION
        or "tree" not in record
    ):
        raise AuditLogError(f"expected an audit record {{'version': {AUDIT_VERSION}, 'tree': ...}}")
    try:
        return from_plain(ScoredTree, record["tree"], "audit record: tree")
    except (KeyError, TypeError, ValueError) as err:
        raise AuditLogError(f"malformed audit record: {type(err).__name__}: {err}") from None


def replay(record: dict) -> tuple[tuple[list[TokenPair], list[TokenPair]], dict[str, float]]:
    """((attacker_pairs, defender_pairs), metrics) of a logged tree, recomputed."""
    scored = record_to_scored_tree(record)
    cfg = scored.config
    att_on = cfg.attacker_judge_enabled and not scored.skip_attacker
    for b, a, att in scored.attacks():
        try:
            x_reward = attack_reward(att, cfg.selection, att_on)
            y_reward = tuple(
                patch_reward(r.error, r.raw_reward, cfg.defender_judge_enabled)
                for r in att.responses
            )
        except ValueError as err:
            raise AuditLogError(f"audit record: attack ({b}, {a}): {err}") from None
        if x_reward != att.reward or y_reward != tuple(r.reward for r in att.responses):
            raise AuditLogError(
                f"audit record: attack ({b}, {a}): logged patched rewards differ "
                "from the ones its errors and raw judge rewards give"
            )
    return (pairs(scored, "attacker"), pairs(scored, "defender")), tree_metrics(scored)
