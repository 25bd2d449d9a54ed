"""Reward patching table (GAME_SPEC §2.9), response selection, pair choice and swap_positions."""

import pytest

from advgame_jax.data import Seed
from advgame_jax.game import GameConfig, build_tree, tree_metrics
from advgame_jax.game.rewards import (
    argmax_first,
    argmin_first,
    patch_reward,
    preference,
    select_response,
)
from advgame_jax.game.tree import XError, YError
from tests.game_stubs import ByteTokenizer, ScriptedJudge, ScriptedSampler


@pytest.mark.parametrize(
    "error, raw, enabled, expected",
    [
        (None, 7.5, True, 7.5),
        (None, None, False, 0.0),
        (None, 7.5, False, 0.0),
        (XError.MAX_LENGTH, None, True, -1.0),
        (XError.PARSING, None, True, -1.0),
        (XError.NOT_FAITHFUL, None, True, -1.0),
        (XError.NOT_FAITHFUL, None, False, -1.0),
        (XError.BAD_FAITH_JUDGE, None, True, None),
        (XError.NO_VALID_RESPONSE, None, True, None),
        (XError.BAD_ATT_JUDGE, None, True, None),
    ],
)
def test_patch_attacker_reward(error, raw, enabled, expected):
    assert patch_reward(error, raw, enabled) == expected


@pytest.mark.parametrize(
    "error, raw, enabled, expected",
    [
        (None, 3.0, True, 3.0),
        (None, None, False, 0.0),
        (YError.MAX_LENGTH, None, True, -1.0),
        (YError.PARSING, None, False, -1.0),
        (YError.PROMPT_NOT_VALID, None, True, None),
        (YError.BAD_DEF_JUDGE, None, True, None),
    ],
)
def test_patch_defender_reward(error, raw, enabled, expected):
    assert patch_reward(error, raw, enabled) == expected


def test_patch_rejects_missing_judge_score():
    with pytest.raises(ValueError, match="raw reward"):
        patch_reward(None, None, True)


def test_argbest_and_preference():
    assert argmax_first([None, 3.0, 5.0, 5.0]) == 2
    assert argmin_first([2.0, None, -1.0, -1.0]) == 2
    assert argmax_first([None, None]) is None
    assert preference([1.0, 4.0, None, 0.5]) == (1, 3)
    assert preference([4.0, 4.0, None]) is None  # tie -> no pair
    assert preference([None, 4.0, None]) is None  # one value -> no pair
    assert preference([-1.0, 2.0, 2.0, -1.0]) == (1, 0)  # first index wins both ties


def test_select_response():
    # optimistic: best judged response, first wins ties
    assert select_response([True, True, True], [2.0, 6.0, 6.0], True) == 1
    # non-optimistic: first judged response
    assert select_response([True, True, True], [2.0, 6.0, 6.0], False) == 0
    # sampling errors are never selected, even when a reward is passed
    assert select_response([False, True], [9.0, 1.0], True) == 1
    # no judged response (all BAD_DEF_JUDGE): first response without a sampling error
    assert select_response([False, True, True], [None, None, None], True) == 1
    assert select_response([False, False], [None, None], False) is None


def _swap_tree(swap: bool):
    tok = ByteTokenizer()
    responses = {"x0": ["r0", "r1"], "x1": ["r2", "r3"]}
    scores = {
        ("deflection", "r0"): 6,
        ("deflection", "r1"): 5.5,
        ("deflection", "r2"): 6,
        ("deflection", "r3"): 2,
        ("compliance", "r0"): 4,
        ("compliance", "r2"): 4,
    }
    judge = ScriptedJudge({"x0": True, "x1": True}, scores, position_bias=1.0)
    cfg = GameConfig(num_attacks=2, num_responses=2, attacker_format="any", swap_positions=swap)
    scored = build_tree(
        [Seed("s harmful", "harmful")],
        cfg,
        judge=judge,
        attacker=ScriptedSampler(lambda p, i: f"x{i}"),
        attacker_tokenizer=tok,
        defender=ScriptedSampler(lambda p, i: responses[p][i]),
        defender_tokenizer=tok,
    )
    return scored, judge


def test_swap_positions_doubles_calls_and_averages():
    plain, judge = _swap_tree(False)
    assert [len(r) for m, r in judge.calls if m == "pairwise"] == [2, 1]
    # Position A gets +1: one order only.
    assert plain.per_response("raw_reward") == (((7.0, 5.5), (7.0, 2.0)),)
    assert plain.per_attack("raw_reward") == ((5.0, 4.0),)
    assert "judge/defender/order_disagreement" not in tree_metrics(plain)

    swapped, judge = _swap_tree(True)
    assert judge.count("pairwise") == 2  # still one call per stage
    assert [len(r) for m, r in judge.calls if m == "pairwise"] == [4, 2]
    reqs = judge.requests("pairwise")
    assert [(r.response_a, r.response_b) for r in reqs[:4]] == [
        ("r0", "r1"),
        ("r1", "r0"),
        ("r2", "r3"),
        ("r3", "r2"),
    ]
    # r0: (7 as A, 6 as B) -> 6.5; r1: (5.5 as B, 6.5 as A) -> 6.0; r2 -> 6.5; r3: (2, 3) -> 2.5
    assert swapped.per_response("raw_reward") == (((6.5, 6.0), (6.5, 2.5)),)
    assert swapped.per_response("judge_scores")[0][0] == ((7.0, 6.0), (5.5, 6.5))
    # The attacks' selected responses (r0, r2) both score 4 (+1 in position A): 4.5 each, a tie.
    assert swapped.per_attack("raw_reward") == ((4.5, 4.5),)
    m = tree_metrics(swapped)
    # (r0, r1): A preferred in both orders -> preferred side flips; (r2, r3): r2 both times.
    assert m["judge/defender/order_disagreement"] == 0.5
    assert m["judge/attacker/order_disagreement"] == 1.0
    assert (m["pairs/attacker"], m["pairs/defender"]) == (0.0, 2.0)
