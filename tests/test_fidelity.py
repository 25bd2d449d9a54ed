"""Golden tests of the reference implementation's rules (GAME_SPEC §2b, issue "Fidelity"):
LR schedule, judge decoding, gradient normalisation, empty-split steps, the GRPO importance
weight, parsing in the rollout, selection and defender pairs. Every expected value is worked
out by hand from the rule cited next to it, never computed by the code under test."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advgame_jax import losses
from advgame_jax.data import Seed
from advgame_jax.experiment.update_settings import optimizer_settings, player_training
from advgame_jax.game import GameConfig, build_tree, make_judge, pairs
from advgame_jax.game.normalization import (
    pair_weight,
    pairs_per_seed,
    reference_normaliser,
    sample_weight,
    with_weight,
)
from advgame_jax.game.tree import XError
from advgame_jax.settings import JudgeSettings, OptimSettings
from advgame_jax.training.optimizer import current_lr
from tests.game_stubs import ByteTokenizer, ScriptedJudge, ScriptedSampler
from tests.test_game_golden import CFG, SEEDS, TOK, play


# ---- 2. LR schedule -------------------------------------------------------------------------
def _lrs(schedule: str, num_trainer_steps: int, updates: int, *, zero_grads=False):
    optim = OptimSettings(
        lr=1e-6,
        b1=0.9,
        b2=0.95,
        weight_decay=0.1,
        clip_norm=1.0,
        final_lr_fraction=0.2,
        warmup_steps=0,
        lr_schedule=schedule,
    )
    tx = optimizer_settings(optim, num_trainer_steps).build()
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    out = []
    for _ in range(updates):
        g = {"w": jnp.zeros((3,)) if zero_grads else jnp.full((3,), 0.5)}
        _, state = tx.update(g, state, params)
        out.append(float(current_lr(state)))
    return out


def test_cycle_schedule_restarts_every_num_steps_updates():
    # Reference: the scheduler steps once per split, cycle_len = regime.num_steps (here 4), so
    # update k uses final + (lr − final)·½(1 + cos(π·(k mod 4)/4)), final = 0.2·lr.
    c1 = 0.2e-6 + 0.8e-6 * 0.5 * (1 + math.sqrt(0.5))  # k mod 4 = 1: 0.882843e-6
    c2 = 0.6e-6  # k mod 4 = 2
    c3 = 0.2e-6 + 0.8e-6 * 0.5 * (1 - math.sqrt(0.5))  # k mod 4 = 3: 0.317157e-6
    want = [1e-6, c1, c2, c3, 1e-6, c1, c2, c3]  # 4 trainer steps = 8 updates
    assert _lrs("cycle", 4, 8) == pytest.approx(want, rel=1e-6)
    # Updates with zero gradients (a split without pairs) advance the schedule too.
    assert _lrs("cycle", 4, 5, zero_grads=True)[-1] == pytest.approx(1e-6, rel=1e-6)


def test_run_schedule_spans_all_updates_without_restart():
    # Ours: one cosine over 2·num_steps = 8 updates, then 0.2·lr.
    want = [0.2e-6 + 0.8e-6 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert _lrs("run", 4, 10) == pytest.approx(want + [0.2e-6, 0.2e-6], rel=1e-6)


def test_zero_gradient_adamw_step_still_decays_weights():
    # Reference: a split without pairs still steps AdamW. With zero gradients the Adam moments
    # stay 0, so the only change is decoupled weight decay: w ← w − lr·wd·w = w·(1 − 0.1·0.1).
    optim = OptimSettings(
        lr=0.1,
        b1=0.9,
        b2=0.95,
        weight_decay=0.1,
        clip_norm=1.0,
        final_lr_fraction=1.0,
        warmup_steps=0,
        lr_schedule="cycle",
    )
    tx = optimizer_settings(optim, 10).build()
    params = {"w": jnp.full((2, 2), 2.0)}
    upd, _ = tx.update({"w": jnp.zeros((2, 2))}, tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, upd)["w"], 2.0 * 0.99, rtol=1e-6)


# ---- 3. Judge decoding ------------------------------------------------------------------------
class _CountingSampler(ScriptedSampler):
    """Answers the k-th pairwise prompt it sees with the k-th scripted text."""

    def __init__(self, answers):
        super().__init__(lambda text, i: "", ByteTokenizer())
        self.answers = list(answers)

    def generate(self, prompt_token_ids, params):
        self.calls.append((len(prompt_token_ids), params))
        from tests.game_stubs import completion

        return [completion(self.tok, self.answers.pop(0)) for _ in prompt_token_ids]


def test_judge_samples_with_reference_decoding_and_averages_n_answers():
    from advgame_jax.game import PairRequest, PointRequest

    cfg = JudgeSettings(
        backend="sampler", temperature=0.6, top_p=0.9, num_samples=3, max_new_tokens=8192
    )
    sampler = _CountingSampler(
        [
            "<think>..</think><score_A>6</score_A><score_B>2</score_B>",
            "<score_A>8</score_A><score_B>x</score_B>",  # half-parsed: the sample fails
            "<score_A>4</score_A><score_B>3</score_B>",
            "<score>7</score>",
            "<score>nope</score>",
            "<score>8.5/10</score>",
        ]
    )
    judge = make_judge(cfg, templates="advgame_paper", sampler=sampler, tokenizer=TOK)
    # Mean over the samples that parsed: A = (6 + 4)/2 = 5, B = (2 + 3)/2 = 2.5.
    assert judge.pairwise([PairRequest("compliance", "q", "a", "b")]) == [(5.0, 2.5)]
    assert judge.pointwise([PointRequest("refusal", "q", "r")]) == [pytest.approx((7 + 8.5) / 2)]
    params = sampler.calls[0][1]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.6, 0.9, 8192)
    assert [n for n, _ in sampler.calls] == [3, 3]  # one call, n answers per request


# ---- 4. Normalisation -------------------------------------------------------------------------
def test_reference_normaliser_counts_a_dummy_row_per_empty_microbatch():
    # Σ over consecutive groups of max(pairs in group, 1).
    assert reference_normaliser([1, 0, 0, 1], 1) == 4  # attacker: Σ / seeds
    assert reference_normaliser([2, 0, 0, 3], 1) == 2 + 1 + 1 + 3
    assert reference_normaliser([2, 0, 0, 3], 2) == 2 + 3
    assert reference_normaliser([0, 0, 0], 2) == 1 + 1
    assert reference_normaliser([], 1) == 0


def test_normalisation_weights_on_the_golden_tree():
    scored, *_ = play(CFG)  # tests/test_game_golden.py: B=4, A=3, D=2
    # Attacker pairs: seed 0 (x02 > x01) and seed 3 (x30 > x32); seeds 1, 2 none.
    assert pairs_per_seed(scored, "attacker") == [1, 0, 0, 1]
    # Defender pairs: x00, x02 (seed 0); x30, x31, x32 (seed 3).
    assert pairs_per_seed(scored, "defender") == [2, 0, 0, 3]
    assert pair_weight(scored, "attacker", "reference") == pytest.approx(1 / 4)
    assert pair_weight(scored, "defender", "reference") == pytest.approx(1 / 7)
    assert pair_weight(scored, "defender", "reference", 2) == pytest.approx(1 / 5)
    assert pair_weight(scored, "attacker", "pairs") is None
    # GRPO: every slot of the tree, B·A = 12 and B·A·D = 24.
    assert sample_weight(scored, "attacker", "reference") == pytest.approx(1 / 12)
    assert sample_weight(scored, "defender", "reference") == pytest.approx(1 / 24)
    assert sample_weight(scored, "defender", "pairs") is None
    weighted = with_weight(pairs(scored, "defender"), 1 / 7)
    assert [p.weight for p in weighted] == [1 / 7] * 5
    with pytest.raises(ValueError, match="normalization"):
        pair_weight(scored, "attacker", "mean")


# ---- 5. Empty splits and 6. GRPO weight: config plumbing ---------------------------------------
def test_update_step_receives_empty_split_and_tis_flags(monkeypatch):
    from advgame_jax.experiment import players
    from advgame_jax.experiment.configs.paper import paper_config

    seen = []
    monkeypatch.setattr(players, "update_step_from", lambda mc, s, **kw: seen.append(s) or object())
    c = paper_config("qwen", "grpo")
    for role in ("attacker", "defender"):
        players._update_step("model", player_training(c, role).update, None, {})
    assert [(s.train.step_on_empty, s.loss.tis_detach) for s in seen] == [(True, False)] * 2


def _grpo_grad(detach: bool, sampler_p: float):
    # One token, log π_θ = θ at θ = log 0.5, advantage 3, no KL term.
    def f(theta):
        lp = jnp.array([[theta]])
        return losses.grpo_loss(
            lp,
            lp,
            jnp.array([3.0]),
            jnp.array([[True]]),
            kl_coef=0.0,
            importance=losses.ImportanceWeighting(
                jnp.log(jnp.array([[sampler_p]])), tis_cap=2.0, detach_weight=detach
            ),
        )[0]

    return jax.value_and_grad(f)(jnp.log(0.5))


def test_grpo_importance_weight_gradient_when_not_detached():
    # w = π/π_sampler = 0.5/0.4 = 1.25 < cap 2. Value −w·A = −3.75 either way.
    v, g = _grpo_grad(detach=True, sampler_p=0.4)
    assert (float(v), float(g)) == pytest.approx((-3.75, -3.75))  # −w·A·∇lp
    v, g = _grpo_grad(detach=False, sampler_p=0.4)
    assert (float(v), float(g)) == pytest.approx((-3.75, -7.5))  # reference: −2·w·A·∇lp
    # w = 0.5/0.2 = 2.5 is capped at 2: the cap has no gradient, −cap·A = −6 in both modes.
    for detach in (True, False):
        v, g = _grpo_grad(detach=detach, sampler_p=0.2)
        assert (float(v), float(g)) == pytest.approx((-6.0, -6.0))
    # A sample without sampler log-probs keeps w = 1 and no gradient from it, in both modes.
    for detach in (True, False):
        g = jax.grad(
            lambda th, detach=detach: losses.grpo_loss(
                jnp.array([[th]]),
                jnp.array([[th]]),
                jnp.array([3.0]),
                jnp.array([[True]]),
                kl_coef=0.0,
                importance=losses.ImportanceWeighting(
                    jnp.array([[th]]),
                    tis_cap=2.0,
                    detach_weight=detach,
                    sampler_rows=jnp.array([False]),
                ),
            )[0]
        )(jnp.log(0.5))
        assert float(g) == pytest.approx(-3.0)  # −1·A·∇lp
    # A stale sampler (ratio e^100) gives a finite, capped value and gradient.
    v, g = _grpo_grad(detach=False, sampler_p=float(np.exp(-100.0)))
    assert np.isfinite(float(g)) and float(v) == pytest.approx(-6.0)


# ---- 7. Parsing inside the rollout ------------------------------------------------------------
def test_rollout_reference_parsing_rules():
    seeds = [Seed("s0 harmful seed", "harmful")]

    def attacker(prompt, i):
        return [
            ("<THINK>p</THINK><PROMPT>xa</PROMPT>", "abort"),  # not "stop" → MAX_LENGTH
            "<THINK>p</THINK><PROMPT>xb</PROMPT>",  # tags in any case parse
            "<think>p</think><prompt>xc <prompt>y</prompt>",  # 'prompt>' in body → PARSING
            "<think>p</think><prompt>xd</prompt>",
        ][i]

    def defender(prompt, i):
        return {"xb": ["rb0", "rb1"], "xd": ["rd0", "rd1"]}[prompt][i]

    # Two faithfulness samples each: xd gets a 1–1 tie. Reference: not a strict majority for
    # "faithful" → NOT_FAITHFUL (−1); ours: BAD_FAITH_JUDGE (excluded).
    faith = {"xb": [True, True], "xd": [True, False]}
    scores = {("deflection", r): s for r, s in (("rb0", 4), ("rb1", 6), ("rd0", 1), ("rd1", 2))}
    scores.update({("compliance", "rb1"): 5})
    for tie, want_err, want_rew in (
        ("not_faithful", XError.NOT_FAITHFUL, -1.0),
        ("bad_judge", XError.BAD_FAITH_JUDGE, None),
    ):
        cfg = GameConfig(num_attacks=4, num_responses=2, num_faith_samples=2, faith_tie=tie)
        scored = build_tree(
            seeds,
            cfg,
            judge=ScriptedJudge(dict(faith), scores),
            attacker=ScriptedSampler(attacker),
            attacker_tokenizer=TOK,
            defender=ScriptedSampler(defender),
            defender_tokenizer=TOK,
        )
        assert scored.per_attack("x")[0][1] == "xb"
        assert scored.per_attack("error")[0] == (XError.MAX_LENGTH, None, XError.PARSING, want_err)
        assert scored.per_attack("reward")[0] == (-1.0, 5.0, -1.0, want_rew)


# ---- 8. Selection and defender pairs -----------------------------------------------------------
def test_reference_selection_leaves_attack_unjudged_after_bad_def_judge():
    # Golden tree seed 2: x21's responses r210, r211 are unscorable (BAD_DEF_JUDGE); x22's
    # selected response r220 is unscorable by the attacker judge.
    ours, *_ = play(CFG)
    assert ours.per_attack("reward")[2] == (None, 4.0, None)  # fallback: x21 judged on r210 (4)
    ref, judge, *_ = play(GameConfig(num_attacks=3, num_responses=2, selection="reference"))
    # Reference: x21 is not sent to the attacker judge and keeps 0.0 with no error; x22 is
    # then compared with itself, unscorable → BAD_ATT_JUDGE.
    assert ref.per_attack("error")[2] == (XError.NO_VALID_RESPONSE, None, XError.BAD_ATT_JUDGE)
    assert ref.per_attack("reward")[2] == (None, 0.0, None)
    att_reqs = [r for r in judge.calls[2][1] if r.query == "s2 harmful seed"]
    assert [(r.response_a, r.response_b) for r in att_reqs] == [("r220", "r220")]
    # Seeds 0 and 3 are unaffected.
    assert (
        ref.per_attack("reward")[0] == ours.per_attack("reward")[0]
        and ref.per_attack("reward")[3] == ours.per_attack("reward")[3]
    )
    # The audit log replays such a tree: same pairs, the unjudged attack's 0.0 reproduced.
    from advgame_jax.codec import to_plain
    from advgame_jax.game.audit import AUDIT_VERSION, replay

    (att, dfd), _ = replay({"version": AUDIT_VERSION, "tree": to_plain(ref)})
    assert att == pairs(ref, "attacker") and dfd == pairs(ref, "defender")


def test_reference_defender_pairs_only_from_error_free_attacks():
    seeds = [Seed("s0 harmful seed", "harmful")]
    attacks = ["<think>p</think><prompt>x0</prompt>", "<think>p</think><prompt>x1</prompt>"]
    responses = {"x0": ["r0a", "r0b"], "x1": ["r1a", "r1b"]}
    scores = {
        ("deflection", "r0a"): 3,
        ("deflection", "r0b"): 7,
        ("deflection", "r1a"): 6,
        ("deflection", "r1b"): 2,
        ("compliance", "r1a"): 5,
    }  # r0b unscorable for the attacker judge
    out = {}
    for sel in ("reference", "fallback"):
        cfg = GameConfig(num_attacks=2, num_responses=2, selection=sel)
        scored = build_tree(
            seeds,
            cfg,
            judge=ScriptedJudge({"x0": True, "x1": True}, scores),
            attacker=ScriptedSampler(lambda p, i: attacks[i]),
            attacker_tokenizer=TOK,
            defender=ScriptedSampler(lambda p, i: responses[p][i]),
            defender_tokenizer=TOK,
        )
        # Optimistic selection: x0 → r0b (7), x1 → r1a (6); r0b has no attacker score.
        assert scored.per_attack("error")[0] == (XError.BAD_ATT_JUDGE, None)
        assert scored.per_response("error")[0] == ((None, None), (None, None))
        out[sel] = [
            (TOK.decode(p.chosen_ids), TOK.decode(p.rejected_ids))
            for p in pairs(scored, "defender")
        ]
    assert out["reference"] == [("r1a", "r1b")]  # x0 had BAD_ATT_JUDGE
    assert out["fallback"] == [("r0b", "r0a"), ("r1a", "r1b")]


# ---- Whole-split validation in chunks ----------------------------------------------------------
def test_chunked_tree_summarises_like_the_whole_batch():
    from advgame_jax.game import concat_scored_trees, tree_metrics

    whole, *_ = play(CFG)
    parts = [
        play(CFG, seeds=SEEDS[:1])[0],
        play(CFG, seeds=SEEDS[1:3])[0],
        play(CFG, seeds=SEEDS[3:])[0],
    ]
    joined = concat_scored_trees(parts)
    assert joined.shape == whole.shape == (4, 3, 2)
    assert joined.per_attack("reward") == whole.per_attack("reward")
    assert joined.per_response("error") == whole.per_response("error")
    assert joined.per_attack("ids") == whole.per_attack("ids")
    # Judge requests are counted per chunk and summed: 10 + 7 + 5 as in the golden test.
    assert tree_metrics(joined) == pytest.approx(tree_metrics(whole))
    with pytest.raises(ValueError, match="at least one"):
        concat_scored_trees([])
