"""All 512 shared WildJailbreak seeds through the game with fast pseudo-random stub samplers and
the rule judge: every slot is accounted for. The prompts are read in place and never printed."""

import collections

import pytest

from advgame_jax.data import read_seeds_jsonl
from advgame_jax.game import (
    GameConfig,
    RuleJudge,
    build_tree,
    grpo_samples,
    pairs,
    tree_metrics,
)
from advgame_jax.game.tree import XError, YError
from tests.game_stubs import ByteTokenizer, PseudoRandomAttacker, PseudoRandomDefender


@pytest.fixture(scope="module")
def seeds(wildjailbreak_dir):
    out = []
    for path in sorted(wildjailbreak_dir.glob("*.jsonl")):
        out += read_seeds_jsonl(path)
    assert len(out) == 512
    return out


@pytest.mark.parametrize(
    "mode, swap", [("pairwise", False), ("pointwise", False), ("pairwise", True)]
)
def test_all_seeds_every_slot_accounted_for(seeds, mode, swap):
    tok = ByteTokenizer()
    A, D = 2, 3
    cfg = GameConfig(num_attacks=A, num_responses=D, judge_mode=mode, swap_positions=swap)
    att, dfd = PseudoRandomAttacker(seed=1), PseudoRandomDefender(seed=2)
    scored = build_tree(
        seeds,
        cfg,
        judge=RuleJudge(),
        attacker=att,
        attacker_tokenizer=tok,
        defender=dfd,
        defender_tokenizer=tok,
    )
    B = len(seeds)
    assert scored.shape == (B, A, D)
    assert len(att.calls) == 1 and len(dfd.calls) == 1

    x_counts = collections.Counter(e for row in scored.per_attack("error") for e in row)
    y_counts = collections.Counter(
        e for rows in scored.per_response("error") for row in rows for e in row
    )
    assert sum(x_counts.values()) == B * A and sum(y_counts.values()) == B * A * D
    assert set(x_counts) <= {None, *XError} and set(y_counts) <= {None, *YError}
    # The stubs produce every sampling-side error, and the rule judge never fails.
    for e in (XError.MAX_LENGTH, XError.PARSING, XError.NOT_FAITHFUL, None):
        assert x_counts[e] > 0, e
    assert x_counts[XError.BAD_FAITH_JUDGE] == x_counts[XError.BAD_ATT_JUDGE] == 0
    assert y_counts[YError.MAX_LENGTH] > 0 and y_counts[YError.BAD_DEF_JUDGE] == 0
    # D slots of every invalid attack are PROMPT_NOT_VALID, and only those.
    not_sampled = sum(
        e is not None and e != XError.NO_VALID_RESPONSE
        for row in scored.per_attack("error")
        for e in row
    )
    assert y_counts[YError.PROMPT_NOT_VALID] == D * not_sampled

    m = tree_metrics(scored)
    assert m["x/rate/valid"] + sum(m[f"x/rate/{e.value}"] for e in XError) == pytest.approx(1.0)
    assert m["y/rate/valid"] + sum(m[f"y/rate/{e.value}"] for e in YError) == pytest.approx(1.0)
    assert m["x/rate/valid"] == x_counts[None] / (B * A)
    for v in m.values():
        assert v == v  # no NaN
    a_pairs, d_pairs = pairs(scored, "attacker"), pairs(scored, "defender")
    assert m["pairs/attacker"] == len(a_pairs) > 0 and m["pairs/defender"] == len(d_pairs) > 0
    for p in a_pairs + d_pairs:
        assert p.prompt_ids and p.chosen_ids and p.rejected_ids
        assert p.chosen_ids != p.rejected_ids
    # Rewards are in range: −1 for penalised slots, [0, 10] for judged ones.
    for row in scored.per_attack("reward"):
        assert all(v is None or v == -1.0 or 0.0 <= v <= 10.0 for v in row)
    assert len(grpo_samples(scored, "defender", "per_seed")) == y_counts[None]
    if swap:
        assert 0.0 <= m["judge/defender/order_disagreement"] <= 1.0
