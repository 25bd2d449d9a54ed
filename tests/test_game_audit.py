"""Audit log: file mode 0600, JSONL round trip, replay equal to the live result."""

import os
import stat

import pytest

from advgame_jax.data import Seed
from advgame_jax.game import (
    AuditLog,
    AuditLogError,
    GameConfig,
    RuleJudge,
    build_tree,
    pairs,
    read_audit_log,
    record_to_scored_tree,
    replay,
    tree_metrics,
)
from tests.game_stubs import ByteTokenizer, PseudoRandomAttacker, PseudoRandomDefender
from tests.test_game_golden import CFG, play

SEEDS = [
    Seed(f"how to bake cake number {i} at home", "harmful" if i % 2 else "benign")
    for i in range(24)
]


def _trees():
    tok = ByteTokenizer()
    out = []
    for cfg, skip in (
        (GameConfig(num_attacks=3, num_responses=2), False),
        (
            GameConfig(
                num_attacks=2,
                num_responses=3,
                judge_mode="pointwise",
                swap_positions=True,
                optimistic_attacker=False,
            ),
            False,
        ),
        (
            GameConfig(num_responses=2, attacker_judge_enabled=False, defender_judge_enabled=False),
            False,
        ),
        (GameConfig(num_responses=2), True),
    ):
        out.append(
            build_tree(
                SEEDS,
                cfg,
                judge=RuleJudge(),
                attacker=PseudoRandomAttacker(3),
                attacker_tokenizer=tok,
                defender=PseudoRandomDefender(4),
                defender_tokenizer=tok,
                skip_attacker=skip,
            )
        )
    out.append(play(CFG)[0])  # the golden tree: every error type, judge failures
    return out


def test_audit_log_mode_roundtrip_and_replay(tmp_path):
    path = tmp_path / "audit" / "trees.jsonl"
    trees = _trees()
    with AuditLog(path) as log:
        for step, scored in enumerate(trees):
            log.write(scored, step=step, split="harmful")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    records = list(read_audit_log(path))
    assert len(records) == len(trees) and records[2]["meta"] == {"step": 2, "split": "harmful"}
    for record, live in zip(records, trees):
        assert record_to_scored_tree(record) == live
        (a_pairs, d_pairs), metrics = replay(record)
        assert a_pairs == pairs(live, "attacker") and d_pairs == pairs(live, "defender")
        assert metrics == tree_metrics(live)
    assert sum(len(replay(r)[0][1]) for r in records) > 0


def test_existing_file_is_tightened_to_0600(tmp_path):
    path = tmp_path / "trees.jsonl"
    path.write_text("")
    os.chmod(path, 0o644)
    AuditLog(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_replay_rejects_tampered_records(tmp_path):
    scored = play(CFG)[0]
    path = tmp_path / "t.jsonl"
    with AuditLog(path) as log:
        log.write(scored)
    record = next(read_audit_log(path))
    record["tree"]["seeds"][0]["attacks"][0]["reward"] = 9.0  # disagrees with its raw reward 3.0
    with pytest.raises(AuditLogError, match="patched rewards differ"):
        replay(record)
    with pytest.raises(AuditLogError, match="audit record"):
        replay({"version": 99})
    path.write_text("{not json\n")
    with pytest.raises(AuditLogError, match=r"t.jsonl:1"):
        list(read_audit_log(path))
