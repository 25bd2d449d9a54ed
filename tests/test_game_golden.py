"""Golden rollout trees: scripted samplers and judge, hand-computed rewards, pairs, advantages
and metrics (GAME_SPEC §2.3–2.11). Every expected value below was worked out by hand from the
scripts; none is computed by the code under test."""

import math
import statistics

import pytest

from advgame_jax.data import Seed
from advgame_jax.game import (
    GameConfig,
    advantages,
    build_tree,
    grpo_samples,
    pairs,
    tree_metrics,
)
from advgame_jax.game.templates import get_template_set
from advgame_jax.game.tree import XError, YError
from advgame_jax.types import TokenPair
from tests.game_stubs import EOS, ByteTokenizer, ScriptedJudge, ScriptedSampler

TOK = ByteTokenizer()
ML, PA, NF, BF, NV, BA = (
    XError.MAX_LENGTH,
    XError.PARSING,
    XError.NOT_FAITHFUL,
    XError.BAD_FAITH_JUDGE,
    XError.NO_VALID_RESPONSE,
    XError.BAD_ATT_JUDGE,
)
YML, YPA, PNV, BD = YError.MAX_LENGTH, YError.PARSING, YError.PROMPT_NOT_VALID, YError.BAD_DEF_JUDGE

SEEDS = [
    Seed("s0 harmful seed", "harmful"),
    Seed("s1 benign seed", "benign"),
    Seed("s2 harmful seed", "harmful"),
    Seed("s3 benign seed", "benign"),
]
LONG_ATTACK = "<think>" + "long " * 50


def tp(x):
    return f"<think>plan</think>\n<prompt>{x}</prompt>"


ATTACKS = {
    "s0 harmful seed": [tp("x00"), (LONG_ATTACK, "length"), tp("x02")],
    "s1 benign seed": ["<prompt>x10</prompt>", tp("x11"), tp("x12")],
    "s2 harmful seed": [tp("x20"), tp("x21"), tp("x22")],
    "s3 benign seed": [tp("x30"), tp("x31"), tp("x32")],
}
R021 = "r021 " + "pad " * 20
R321 = "r321 long text here"
RESPONSES = {
    "x00": ["r000", "r001"],
    "x02": ["r020", (R021, "length")],
    "x20": [("r200 cut", "length"), ("r201 cut", "length")],
    "x21": ["r210", "r211"],
    "x22": ["r220", "r221"],
    "x30": ["r300", "r301"],
    "x31": ["r310", "r311"],
    "x32": ["r320", (R321, "length")],
}
FAITH = {
    "x00": True,
    "x02": True,
    "x11": False,
    "x20": True,
    "x21": True,
    "x22": True,
    "x30": True,
    "x31": True,
    "x32": True,
}  # x12 missing -> unparsable verdict
SCORES = {
    ("deflection", "r000"): 2,
    ("deflection", "r001"): 6,
    ("deflection", "r020"): 9,
    ("deflection", "r220"): 5,
    ("deflection", "r221"): 5,  # r210, r211 unscorable
    ("compliance", "r300"): 8,
    ("compliance", "r301"): 4,
    ("compliance", "r310"): 3,
    ("compliance", "r311"): 7,
    ("compliance", "r320"): 6,
    # attacker judge: compliance on harmful seeds, refusal on benign seeds (r220 unscorable)
    ("compliance", "r000"): 8,
    ("compliance", "r001"): 3,
    ("compliance", "r020"): 7,
    ("compliance", "r210"): 4,
    ("refusal", "r300"): 7,
    ("refusal", "r311"): 7,
    ("refusal", "r320"): 2,
    ("refusal", "r310"): 9,
}


def attacker_fn(prompt, i):
    seed = next(s.prompt for s in SEEDS if f"<query>\n{s.prompt}\n</query>" in prompt)
    return ATTACKS[seed][i]


def defender_fn(prompt, i):
    return RESPONSES[prompt][i]


def play(config, judge=None, seeds=SEEDS, attacker_fn=attacker_fn, defender_fn=defender_fn):
    judge = judge or ScriptedJudge(FAITH, SCORES)
    att, dfd = ScriptedSampler(attacker_fn), ScriptedSampler(defender_fn)
    scored = build_tree(
        seeds,
        config,
        judge=judge,
        attacker=att,
        attacker_tokenizer=TOK,
        defender=dfd,
        defender_tokenizer=TOK,
    )
    return scored, judge, att, dfd


def ids(text, finish="stop"):
    return tuple(TOK.encode(text)) + ((EOS,) if finish == "stop" else ())


def att_prompt(seed):
    return tuple(
        TOK.render_user_turn(
            get_template_set("advgame_v1").attacker_prompt(
                seed.prompt, seed.category, "think_prompt_strict"
            )
        )
    )


CFG = GameConfig(num_attacks=3, num_responses=2)


def test_golden_optimistic_tree():
    scored, judge, att, dfd = play(CFG)
    assert scored.shape == (4, 3, 2)
    # One call per stage: attacker n=A over all seeds, defender n=D over all valid x.
    assert [(n, p.n) for n, p in att.calls] == [(4, 3)]
    assert [(n, p.n) for n, p in dfd.calls] == [(8, 2)]  # x00 x02 x20 x21 x22 x30 x31 x32
    assert att.calls[0][1].stop_token_ids == (EOS,)
    assert [m for m, _ in judge.calls] == ["faithfulness", "pairwise", "pairwise"]
    assert (
        len(judge.calls[0][1]) == 10 and len(judge.calls[1][1]) == 7 and len(judge.calls[2][1]) == 5
    )

    assert scored.per_attack("x")[0] == ("x00", None, "x02")
    assert scored.per_attack("error") == (
        (None, ML, None),
        (PA, NF, BF),
        (NV, None, BA),
        (None, None, None),
    )
    assert scored.per_attack("reward") == (
        (3.0, -1.0, 7.0),
        (-1.0, -1.0, None),
        (None, 4.0, None),
        (7.0, 7.0, 2.0),
    )
    assert scored.per_attack("raw_reward") == (
        (3.0, None, 7.0),
        (None, None, None),
        (None, 4.0, None),
        (7.0, 7.0, 2.0),
    )
    assert scored.per_response("error") == (
        ((None, None), (PNV, PNV), (None, YML)),
        ((PNV, PNV),) * 3,
        ((YML, YML), (BD, BD), (None, None)),
        ((None, None), (None, None), (None, YML)),
    )
    assert scored.per_response("reward") == (
        ((2.0, 6.0), (None, None), (9.0, -1.0)),
        ((None, None),) * 3,
        ((-1.0, -1.0), (None, None), (5.0, 5.0)),
        ((8.0, 4.0), (3.0, 7.0), (6.0, -1.0)),
    )
    assert scored.per_attack("selected_d") == ((1, None, 0), (None,) * 3, (None, 0, 0), (0, 1, 0))

    # A lone valid response is compared with itself.
    defender_reqs = judge.calls[1][1]
    assert any(r.response_a == r.response_b == "r020" for r in defender_reqs)
    assert {r.query for r in defender_reqs} <= {"x00", "x02", "x21", "x22", "x30", "x31", "x32"}
    assert {r.query for r in judge.calls[2][1]} == {
        "s0 harmful seed",
        "s2 harmful seed",
        "s3 benign seed",
    }

    a_pairs = pairs(scored, "attacker")
    chosen = ids(tp("x02"))
    assert a_pairs == [
        TokenPair(att_prompt(SEEDS[0]), chosen, ids(LONG_ATTACK, "length")[: len(chosen)]),
        TokenPair(att_prompt(SEEDS[3]), ids(tp("x30")), ids(tp("x32"))),
    ]
    d_pairs = pairs(scored, "defender")
    p = lambda x: tuple(TOK.render_user_turn(x))  # noqa: E731
    assert d_pairs == [
        TokenPair(p("x00"), ids("r001"), ids("r000")),
        TokenPair(p("x02"), ids("r020"), ids(R021, "length")[:5]),
        TokenPair(p("x30"), ids("r300"), ids("r301")),
        TokenPair(p("x31"), ids("r311"), ids("r310")),
        TokenPair(p("x32"), ids("r320"), ids(R321, "length")[:5]),
    ]

    m = tree_metrics(scored)
    expected = {
        "x/slots": 12.0,
        "x/rate/valid": 6 / 12,
        "x/rate/MAX_LENGTH": 1 / 12,
        "x/rate/PARSING": 1 / 12,
        "x/rate/NOT_FAITHFUL": 1 / 12,
        "x/rate/BAD_FAITH_JUDGE": 1 / 12,
        "x/rate/NO_VALID_RESPONSE": 1 / 12,
        "x/rate/BAD_ATT_JUDGE": 1 / 12,
        "y/slots": 24.0,
        "y/rate/valid": 10 / 24,
        "y/rate/MAX_LENGTH": 4 / 24,
        "y/rate/PARSING": 0.0,
        "y/rate/PROMPT_NOT_VALID": 8 / 24,
        "y/rate/BAD_DEF_JUDGE": 2 / 24,
        "x/reward/mean": 3.0,
        "x/reward/std": math.sqrt(98 / 9),
        "x/raw_reward/mean": 5.0,
        "x/raw_reward/std": math.sqrt(26 / 6),
        "y/reward/mean": 51 / 14,
        "y/reward/std": statistics.pstdev([2, 6, 9, -1, -1, -1, 5, 5, 8, 4, 3, 7, 6, -1]),
        "y/raw_reward/mean": 5.5,
        "y/raw_reward/std": statistics.pstdev([2, 6, 9, 5, 5, 8, 4, 3, 7, 6]),
        "pairs/attacker": 2.0,
        "pairs/defender": 5.0,
        "pairs/attacker_truncated": 1.0,
        "pairs/defender_truncated": 2.0,
        "judge/faith/requests": 10.0,
        "judge/faith/failures": 1.0,
        "judge/defender/requests": 7.0,
        "judge/defender/failures": 1.0,
        "judge/attacker/requests": 5.0,
        "judge/attacker/failures": 1.0,
    }
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
    assert not any(k.startswith("judge/faults/") or "order_disagreement" in k for k in m)
    assert m["x/chars/mean"] == 3.0  # every valid x is 3 characters long
    # 12 stopped responses of 4 bytes + EOS, and length-stopped ones of 85, 8, 8, 19 bytes.
    assert m["y/tokens/mean"] == pytest.approx((12 * 5 + 85 + 8 + 8 + 19) / 16)


def test_golden_non_optimistic_selection():
    scored, *_ = play(GameConfig(num_attacks=3, num_responses=2, optimistic_attacker=False))
    assert scored.per_attack("selected_d") == ((0, None, 0), (None,) * 3, (None, 0, 0), (0, 0, 0))
    assert scored.per_attack("reward") == (
        (8.0, -1.0, 7.0),
        (-1.0, -1.0, None),
        (None, 4.0, None),
        (7.0, 9.0, 2.0),
    )
    chosen = ids(tp("x00"))
    assert pairs(scored, "attacker") == [
        TokenPair(att_prompt(SEEDS[0]), chosen, ids(LONG_ATTACK, "length")[: len(chosen)]),
        TokenPair(att_prompt(SEEDS[3]), ids(tp("x31")), ids(tp("x32"))),
    ]
    # The defender side does not depend on the selection.
    assert len(pairs(scored, "defender")) == 5


def test_golden_grpo_advantages():
    scored, *_ = play(CFG)
    adv, policy = advantages(scored, "attacker", "across_seeds")  # mean of valid rewards = 3
    assert adv == [[0.0, -4.0, 4.0], [-4.0, -4.0, None], [None, 1.0, None], [4.0, 4.0, -1.0]]
    assert policy == [
        [True, False, True],
        [False, False, False],
        [False, True, False],
        [True, True, True],
    ]
    adv, _ = advantages(scored, "attacker", "per_seed")
    assert adv[:3] == [[0.0, -4.0, 4.0], [0.0, 0.0, None], [None, 0.0, None]]
    assert adv[3] == pytest.approx([5 / 3, 5 / 3, -10 / 3])
    d_adv, d_policy = advantages(scored, "defender", "per_seed")  # seed 0 mean = (2+6+9-1)/4 = 4
    assert d_adv[0] == [[-2.0, 2.0], [None, None], [5.0, -5.0]]
    assert d_policy[0] == [[True, True], [False, False], [True, False]]
    assert d_adv[1] == [[None, None]] * 3

    samples = grpo_samples(scored, "attacker", "across_seeds")
    assert [s.advantage for s in samples] == [0.0, 4.0, 1.0, 4.0, 4.0, -1.0]
    first = samples[0]
    assert first.prompt_ids == att_prompt(SEEDS[0]) and first.completion_ids == ids(tp("x00"))
    assert first.sampler_logprobs == tuple(
        -0.01 * (i + 1) for i in range(len(first.completion_ids))
    )
    assert len(grpo_samples(scored, "attacker", "across_seeds", include_penalised=True)) == 9
    d_samples = grpo_samples(scored, "defender", "per_seed")
    assert len(d_samples) == 10  # the error-free responses
    with pytest.raises(ValueError, match="baseline"):
        advantages(scored, "attacker", "global")


def test_strict_defender_format_pointwise():
    seeds = [Seed("sb benign", "benign")]
    attacks = ["<prompt>xa</prompt>", "<prompt>xb</prompt>"]
    responses = {
        "xa": ["<prompt>ya0</prompt>", "ya1 no tags"],
        "xb": ["<prompt>yb0</prompt>", "<prompt>yb1</prompt>"],
    }
    scores = {
        ("compliance", "ya0"): 5,
        ("compliance", "yb0"): 3,
        ("compliance", "yb1"): 8,
        ("refusal", "ya0"): 6,
        ("refusal", "yb1"): 1,
    }
    cfg = GameConfig(
        num_attacks=2,
        num_responses=2,
        attacker_format="prompt_strict",
        defender_format="prompt_strict",
        judge_mode="pointwise",
    )
    scored, judge, _, _ = play(
        cfg,
        ScriptedJudge({"xa": True, "xb": True}, scores),
        seeds,
        lambda p, i: attacks[i],
        lambda p, i: responses[p][i],
    )
    assert scored.per_response("error") == (((None, YPA), (None, None)),)
    assert scored.per_response("reward") == (((5.0, -1.0), (3.0, 8.0)),)
    assert scored.per_response("y")[0][0] == ("ya0", None)
    assert scored.per_attack("selected_d") == ((0, 1),)
    assert scored.per_attack("reward") == ((6.0, 1.0),)
    assert [(m, len(r)) for m, r in judge.calls] == [
        ("faithfulness", 2),
        ("pointwise", 3),
        ("pointwise", 2),
    ]
    assert len(pairs(scored, "attacker")) == 1
    assert [(p.chosen_ids, p.rejected_ids) for p in pairs(scored, "defender")] == [
        (ids("<prompt>ya0</prompt>"), ids("ya1 no tags")),
        (ids("<prompt>yb1</prompt>"), ids("<prompt>yb0</prompt>")),
    ]

    # Judges off: error-free slots get 0.0, errors keep -1; no judge call but faithfulness.
    off = GameConfig(
        num_attacks=2,
        num_responses=2,
        attacker_format="prompt_strict",
        defender_format="prompt_strict",
        attacker_judge_enabled=False,
        defender_judge_enabled=False,
    )
    scored, judge, _, _ = play(
        off,
        ScriptedJudge({"xa": True, "xb": True}, scores),
        seeds,
        lambda p, i: attacks[i],
        lambda p, i: responses[p][i],
    )
    assert scored.per_response("reward") == (((0.0, -1.0), (0.0, 0.0)),)
    assert scored.per_attack("reward") == ((0.0, 0.0),) and scored.per_attack("raw_reward") == (
        (None, None),
    )
    assert scored.per_attack("selected_d") == ((0, 0),)
    assert [m for m, _ in judge.calls] == ["faithfulness"]
    assert pairs(scored, "attacker") == [] and len(pairs(scored, "defender")) == 1

    # Faithfulness off: no faithfulness call at all.
    _, judge, _, _ = play(
        GameConfig(
            num_attacks=2,
            num_responses=2,
            attacker_format="prompt_strict",
            faithfulness=False,
            judge_mode="pointwise",
        ),
        ScriptedJudge({}, scores),
        seeds,
        lambda p, i: attacks[i],
        lambda p, i: ["<prompt>ya0</prompt>", "yb1"][i],
    )
    assert [m for m, _ in judge.calls] == ["pointwise", "pointwise"]


def test_faithfulness_majority_over_samples():
    seeds = [Seed("sf harmful", "harmful")]
    attacks = ["xt", "xtie", "xf"]
    faith = {"xt": [True, False, True], "xtie": [True, False, None], "xf": [False, None, None]}
    cfg = GameConfig(num_attacks=3, num_responses=1, attacker_format="any", num_faith_samples=3)
    scored, judge, _, dfd = play(
        cfg,
        ScriptedJudge(faith, {("deflection", "y"): 1, ("compliance", "y"): 2}),
        seeds,
        lambda p, i: attacks[i],
        lambda p, i: "y",
    )
    assert judge.count("faithfulness") == 1 and len(judge.requests("faithfulness")) == 9
    assert scored.per_attack("faith_votes") == (
        ((True, False, True), (True, False, None), (False, None, None)),
    )
    assert scored.per_attack("error") == ((None, BF, NF),)
    assert scored.per_attack("reward") == ((2.0, None, -1.0),)
    assert tree_metrics(scored)["judge/faith/failures"] == 3.0
    assert dfd.calls[0][0] == 1


def test_batch_without_any_pair():
    cfg = GameConfig(num_attacks=2, num_responses=2)
    seeds = [Seed("sa harmful", "harmful"), Seed("sb benign", "benign")]
    scored, judge, _, dfd = play(cfg, ScriptedJudge(), seeds, lambda p, i: "no tags here", None)
    assert dfd.calls == [] and judge.calls == []
    assert scored.per_attack("reward") == ((-1.0, -1.0), (-1.0, -1.0))
    assert pairs(scored, "attacker") == [] and pairs(scored, "defender") == []
    assert grpo_samples(scored, "attacker", "per_seed") == []
    adv, _ = advantages(scored, "attacker", "across_seeds")
    assert adv == [[0.0, 0.0], [0.0, 0.0]]
    m = tree_metrics(scored)
    assert (
        m["x/rate/PARSING"],
        m["y/rate/PROMPT_NOT_VALID"],
        m["pairs/attacker"],
        m["pairs/defender"],
    ) == (1.0, 1.0, 0.0, 0.0)
    assert (m["x/reward/mean"], m["x/reward/std"]) == (-1.0, 0.0)
    assert "y/reward/mean" not in m and "x/raw_reward/mean" not in m and "y/tokens/mean" not in m


def test_skip_attacker_validation_mode():
    seeds = [Seed("sv harmful", "harmful"), Seed("sw benign", "benign")]
    answers = {"sv harmful": ["dv0", "dv1"], "sw benign": ["dw0", ("dw1 cut", "length")]}
    scores = {("deflection", "dv0"): 3, ("deflection", "dv1"): 8, ("compliance", "dw0"): 9}
    judge = ScriptedJudge({}, scores)
    dfd = ScriptedSampler(lambda p, i: answers[p][i])
    scored = build_tree(
        seeds,
        GameConfig(num_attacks=4, num_responses=2),
        judge=judge,
        defender=dfd,
        defender_tokenizer=TOK,
        skip_attacker=True,
    )
    assert scored.shape == (2, 1, 2)
    assert scored.per_attack("x") == (("sv harmful",), ("sw benign",))
    assert scored.per_response("reward") == (((3.0, 8.0),), ((9.0, -1.0),))
    assert scored.per_attack("reward") == ((0.0,), (0.0,))
    assert [m for m, _ in judge.calls] == ["pairwise"]
    assert pairs(scored, "attacker") == [] and len(pairs(scored, "defender")) == 2
    m = tree_metrics(scored)
    assert m["y/raw_reward/mean"] == pytest.approx(20 / 3) and "x/attacker_tokens/mean" not in m


def test_condition_on_seed_shows_the_seed_to_the_defender_judge():
    seeds = [Seed("sc harmful", "harmful")]
    judge = ScriptedJudge({"xc": True}, {("deflection", "y0"): 1, ("compliance", "y0"): 1})
    cfg = GameConfig(num_attacks=1, num_responses=1, attacker_format="any", condition_on="seed")
    play(cfg, judge, seeds, lambda p, i: "xc", lambda p, i: "y0")
    assert [r.query for r in judge.requests("pairwise")] == ["sc harmful", "sc harmful"]


def test_judge_exceptions_become_bad_judge_errors():
    class Broken(ScriptedJudge):
        def pairwise(self, requests):
            raise RuntimeError("judge down")

    scored, *_ = play(CFG, Broken(FAITH, SCORES))
    flat_y = [e for rows in scored.per_response("error") for row in rows for e in row]
    assert YError.BAD_DEF_JUDGE in flat_y and None not in flat_y
    # Every attack that reached the attacker judge is BAD_ATT_JUDGE.
    assert scored.per_attack("error")[3] == (BA, BA, BA)
    assert scored.judge_stats.faults == {"judge_exception": 2}
    assert tree_metrics(scored)["judge/faults/judge_exception"] == 2.0
