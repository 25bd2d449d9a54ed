"""Building the rollout tree of one batch of seeds (GAME_SPEC §2.2–2.9).

``sample_tree`` runs the attacker (one ``generate`` call, n = A, over all B seeds), parses the
attacks, checks faithfulness (one judge call over every valid x × ``num_faith_samples``) and
runs the defender (one ``generate`` call, n = D, over all valid x). ``score_tree`` runs the
defender judge (one call), selects the response each attack is judged on, runs the attacker
judge (one call) and patches rewards. ``build_tree`` does both. A stage with nothing to do
makes no call. Judge exceptions and malformed judge results become None results (and the
spec's BAD_*_JUDGE errors), counted as ``judge_exception`` in the tree's judge faults; a
sampler that breaks its contract raises, since no error value can stand for missing samples.

Slots are records while the tree is built (``_Attack`` per (b, a), ``_Response`` per
(b, a, d)) and become the tree's ``*_BA`` / ``*_BAD`` fields at the end. Each judge stage
returns its results with its ``JudgeStats`` part (``game.judging``); the tree's
``judge_stats`` is their sum. ``sample_tree`` alone drops the faithfulness part;
``build_tree`` passes it to ``score_tree(sample_stats=...)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Sequence

from advgame_jax.game import rewards
from advgame_jax.game.config import GameConfig
from advgame_jax.game.judge import FaithRequest, Judge
from advgame_jax.game.judging import STAGES, JudgeGroup, call_judge, judge_groups, stage_stats, sum_stats
from advgame_jax.game.parsing import faith_majority, parse_attack, stopped_early
from advgame_jax.game.templates import attacker_rubric, defender_rubric, get_template_set
from advgame_jax.game.tree import JudgeStats, RolloutTree, ScoredTree, XError, YError
from advgame_jax.sampling.base import Sampler, SamplingParams
from advgame_jax.types import as_ids

__all__ = ["STAGES", "build_tree", "sample_tree", "score_tree"]


def _params(base: SamplingParams, n: int, tokenizer: Any, seed_offset: int) -> SamplingParams:
    stop = base.stop_token_ids or tuple(getattr(tokenizer, "stop_token_ids", ()) or ())
    return dataclasses.replace(base, n=n, stop_token_ids=tuple(int(t) for t in stop),
                               seed=base.seed + seed_offset)


def _generate(sampler: Sampler, prompts: list, params: SamplingParams, who: str):
    out = list(sampler.generate(prompts, params))
    if len(out) != len(prompts) * params.n:
        raise ValueError(f"{who} sampler returned {len(out)} completions for {len(prompts)} "
                         f"prompts × n={params.n}")
    return out



class _Attack(NamedTuple):
    """One attack slot after sampling: raw output, its ids, log-probs and finish reason, the
    parsed attack x (None on error) and the slot's error so far."""

    text: str
    ids: tuple
    logprobs: tuple
    finish: Optional[str]
    x: Optional[str]
    error: Optional[XError]


class _Response(NamedTuple):
    """One response slot after sampling; ``response`` is what judges see (None on error)."""

    text: str
    response: Optional[str]
    ids: tuple
    logprobs: tuple
    finish: Optional[str]
    error: Optional[YError]


_UNSAMPLED = _Response("", None, (), (), None, YError.PROMPT_NOT_VALID)


def _nested(grid, name: str) -> tuple:
    """Field ``name`` of every record in a nested list of records, as nested tuples."""
    if isinstance(grid, list):
        return tuple(_nested(g, name) for g in grid)
    return getattr(grid, name)


def _sample_attacks(s_B, cat_B, config, templates, attacker, attacker_tokenizer, sample_index):
    """Attacker prompts per seed and the [B][A] grid of parsed attack slots."""
    A = config.num_attacks
    prompts = tuple(as_ids(attacker_tokenizer.render_user_turn(
        templates.attacker_prompt(s, c, config.attacker_format))) for s, c in zip(s_B, cat_B))
    params = _params(config.attacker_sampling, A, attacker_tokenizer, 2 * sample_index)
    comps = _generate(attacker, list(prompts), params, "attacker") if s_B else []
    grid = []
    for b in range(len(s_B)):
        row = []
        for c in comps[b * A:(b + 1) * A]:
            x, err = None, None
            if stopped_early(c.finish_reason):
                err = XError.MAX_LENGTH
            else:
                x = parse_attack(c.text, config.attacker_format)
                err = XError.PARSING if x is None else None
            row.append(_Attack(c.text, as_ids(c.token_ids), tuple(float(v) for v in c.logprobs),
                               c.finish_reason, x, err))
        grid.append(row)
    return prompts, grid


def _check_faithfulness(judge, config, s_B, cat_B, att) -> tuple[list, JudgeStats]:
    """Faithfulness votes per attack slot ([B][A]); sets NOT_FAITHFUL / BAD_FAITH_JUDGE in ``att``."""
    votes = [[() for _ in row] for row in att]
    slots = [(b, a) for b, row in enumerate(att) for a, t in enumerate(row) if t.error is None]
    k = config.num_faith_samples
    reqs = [FaithRequest(s_B[b], att[b][a].x, cat_B[b]) for b, a in slots for _ in range(k)]
    verdicts, part = call_judge(judge, "faithfulness", "faith", reqs, None)
    failures = 0
    for i, (b, a) in enumerate(slots):
        vs = tuple(v if isinstance(v, bool) else None for v in verdicts[i * k:(i + 1) * k])
        votes[b][a] = vs
        failures += sum(v is None for v in vs)
        verdict = faith_majority(vs, config.faith_tie)
        if verdict is None:
            att[b][a] = att[b][a]._replace(error=XError.BAD_FAITH_JUDGE)
        elif not verdict:
            att[b][a] = att[b][a]._replace(error=XError.NOT_FAITHFUL)
    return votes, dataclasses.replace(part, failures={"faith": failures})


def _sample_responses(config, templates, att, defender, defender_tokenizer, sample_index):
    """Defender prompts ([B][A]) and response slots ([B][A][D]) for every valid attack; an
    attack none of whose responses is usable gets NO_VALID_RESPONSE in ``att``."""
    D = config.num_responses
    valid = [(b, a) for b, row in enumerate(att) for a, t in enumerate(row) if t.error is None]
    prompts = [[() for _ in row] for row in att]
    for b, a in valid:
        prompts[b][a] = as_ids(defender_tokenizer.render_user_turn(templates.defender_prompt(att[b][a].x)))
    y = [[[_UNSAMPLED] * D for _ in row] for row in att]
    if not valid:
        return prompts, y
    params = _params(config.defender_sampling, D, defender_tokenizer, 2 * sample_index + 1)
    comps = _generate(defender, [prompts[b][a] for b, a in valid], params, "defender")
    for i, (b, a) in enumerate(valid):
        for d, c in enumerate(comps[i * D:(i + 1) * D]):
            resp, err = None, None
            if stopped_early(c.finish_reason):
                err = YError.MAX_LENGTH
            else:
                resp = parse_attack(c.text, config.defender_format)
                err = YError.PARSING if resp is None else None
            y[b][a][d] = _Response(c.text, resp, as_ids(c.token_ids),
                                   tuple(float(v) for v in c.logprobs), c.finish_reason, err)
        if all(r.error is not None for r in y[b][a]):
            att[b][a] = att[b][a]._replace(error=XError.NO_VALID_RESPONSE)
    return prompts, y


def _sample(seeds, config, judge, defender, defender_tokenizer, attacker, attacker_tokenizer,
            skip_attacker, sample_index) -> tuple[RolloutTree, JudgeStats]:
    templates = get_template_set(config.templates)
    s_B = tuple(str(s.prompt) for s in seeds)
    cat_B = tuple(str(s.category) for s in seeds)
    for c in cat_B:
        if c not in ("harmful", "benign"):
            raise ValueError(f"seed category must be 'harmful' or 'benign', got {c!r}")
    if skip_attacker:
        att_prompt = tuple(() for _ in s_B)
        att = [[_Attack("", (), (), None, s, None)] for s in s_B]
    else:
        if attacker is None or attacker_tokenizer is None:
            raise ValueError("build_tree: attacker and attacker_tokenizer are required unless skip_attacker=True")
        att_prompt, att = _sample_attacks(s_B, cat_B, config, templates, attacker,
                                          attacker_tokenizer, sample_index)
    if config.faithfulness and not skip_attacker:
        votes, faith = _check_faithfulness(judge, config, s_B, cat_B, att)
    else:
        votes, faith = [[() for _ in row] for row in att], stage_stats("faith")
    def_prompt, y = _sample_responses(config, templates, att, defender, defender_tokenizer, sample_index)
    tree = RolloutTree(
        s_B=s_B, category_B=cat_B, skip_attacker=skip_attacker, att_prompt_ids_B=att_prompt,
        att_text_BA=_nested(att, "text"), att_ids_BA=_nested(att, "ids"),
        att_logprobs_BA=_nested(att, "logprobs"), att_finish_BA=_nested(att, "finish"),
        x_BA=_nested(att, "x"), faith_votes_BA=tuple(tuple(r) for r in votes),
        x_error_BA=_nested(att, "error"), def_prompt_ids_BA=tuple(tuple(r) for r in def_prompt),
        y_text_BAD=_nested(y, "text"), y_response_BAD=_nested(y, "response"),
        y_ids_BAD=_nested(y, "ids"), y_logprobs_BAD=_nested(y, "logprobs"),
        y_finish_BAD=_nested(y, "finish"), y_error_BAD=_nested(y, "error"))
    return tree, faith


def sample_tree(seeds: Sequence, config: GameConfig, *, judge: Judge, defender: Sampler,
                defender_tokenizer: Any, attacker: Optional[Sampler] = None,
                attacker_tokenizer: Any = None, skip_attacker: bool = False,
                sample_index: int = 0) -> RolloutTree:
    """Sample attacks, check faithfulness and sample responses (see module docstring)."""
    return _sample(seeds, config, judge, defender, defender_tokenizer, attacker,
                   attacker_tokenizer, skip_attacker, sample_index)[0]


def _judged(verdicts: dict, scores, raw, errors, bad) -> None:
    """Write each judged slot's scores and their mean; a slot without any score gets ``bad``."""
    for slot, vals in verdicts.items():
        *outer, last = slot
        _at(scores, outer)[last] = vals
        _at(raw, outer)[last] = sum(vals) / len(vals) if vals else None
        if not vals:
            _at(errors, outer)[last] = bad


def _at(grid, index):
    for i in index:
        grid = grid[i]
    return grid


def _grid(shape, value) -> list:
    """A nested list of ``shape`` filled with ``value``."""
    if len(shape) == 1:
        return [value] * shape[0]
    return [_grid(shape[1:], value) for _ in range(shape[0])]


def _tuples(grid) -> tuple:
    return tuple(_tuples(g) for g in grid) if isinstance(grid, list) else grid


def _defender_groups(tree: RolloutTree, config: GameConfig, x_err, y_err) -> list[JudgeGroup]:
    """One group per valid attack: its error-free responses, judged against x (or s)."""
    B, A, D = tree.shape
    groups = []
    for b in range(B):
        for a in range(A):
            cands = [d for d in range(D) if x_err[b][a] is None and y_err[b][a][d] is None]
            if cands:
                query = tree.x_BA[b][a] if config.condition_on == "prompt" else tree.s_B[b]
                groups.append(JudgeGroup(defender_rubric(tree.category_B[b]), query,
                                         tuple((b, a, d) for d in cands),
                                         tuple(tree.y_response_BAD[b][a][d] for d in cands)))
    return groups


def _attacker_groups(tree: RolloutTree, x_err, selected, unjudged) -> list[JudgeGroup]:
    """One group per seed: the selected response of each valid, judged attack, against s."""
    B, A, _ = tree.shape
    groups = []
    for b in range(B):
        cands = [a for a in range(A) if x_err[b][a] is None and (b, a) not in unjudged]
        if cands:
            groups.append(JudgeGroup(attacker_rubric(tree.category_B[b]), tree.s_B[b],
                                     tuple((b, a) for a in cands),
                                     tuple(tree.y_response_BAD[b][a][selected[b][a]] for a in cands)))
    return groups


def _select(tree: RolloutTree, config: GameConfig, x_err, y_err, y_rew):
    """The response each valid attack is judged on ([B][A]), and the attacks left unjudged.

    Reference rule: an attack whose selected response has no defender judgment
    (BAD_DEF_JUDGE) is not sent to the attacker judge; it keeps reward 0.0.
    """
    B, A, D = tree.shape
    selected, unjudged = _grid((B, A), None), set()
    for b in range(B):
        for a in range(A):
            if x_err[b][a] is None:
                sampled_ok = [tree.y_error_BAD[b][a][d] is None for d in range(D)]
                judged = [y_rew[b][a][d] if y_err[b][a][d] is None else None for d in range(D)]
                selected[b][a] = d = rewards.select_response(sampled_ok, judged,
                                                             config.optimistic_attacker)
                if (config.selection == "reference" and d is not None
                        and y_err[b][a][d] == YError.BAD_DEF_JUDGE):
                    unjudged.add((b, a))
    return selected, unjudged


def score_tree(tree: RolloutTree, config: GameConfig, *, judge: Judge,
               sample_stats: Optional[JudgeStats] = None) -> ScoredTree:
    """Defender judge → response selection → attacker judge → patched rewards.

    ``sample_stats``: judge statistics of the sampling stages, added to the tree's.
    """
    B, A, D = tree.shape
    att_judge_on = config.attacker_judge_enabled and not tree.skip_attacker
    y_err = [[list(r) for r in rows] for rows in tree.y_error_BAD]
    x_err = [list(r) for r in tree.x_error_BA]
    parts = [sample_stats] if sample_stats is not None else []

    y_scores, y_raw = _grid((B, A, D), ()), _grid((B, A, D), None)
    if config.defender_judge_enabled:
        verdicts, part = judge_groups(judge, "defender", _defender_groups(tree, config, x_err, y_err), config)
        _judged(verdicts, y_scores, y_raw, y_err, YError.BAD_DEF_JUDGE)
        parts.append(part)
    y_rew = [[[rewards.patch_y_reward(y_err[b][a][d], y_raw[b][a][d], config.defender_judge_enabled)
               for d in range(D)] for a in range(A)] for b in range(B)]

    selected, unjudged = _select(tree, config, x_err, y_err, y_rew)

    x_scores, x_raw = _grid((B, A), ()), _grid((B, A), None)
    if att_judge_on:
        verdicts, part = judge_groups(judge, "attacker", _attacker_groups(tree, x_err, selected, unjudged),
                                      config)
        _judged(verdicts, x_scores, x_raw, x_err, XError.BAD_ATT_JUDGE)
        parts.append(part)
    x_rew = [[0.0 if (b, a) in unjudged and x_err[b][a] is None
              else rewards.patch_x_reward(x_err[b][a], x_raw[b][a], att_judge_on)
              for a in range(A)] for b in range(B)]

    return ScoredTree(
        tree=tree, config=config, y_judge_scores_BAD=_tuples(y_scores), y_raw_reward_BAD=_tuples(y_raw),
        y_error_BAD=_tuples(y_err), y_reward_BAD=_tuples(y_rew), selected_d_BA=_tuples(selected),
        x_judge_scores_BA=_tuples(x_scores), x_raw_reward_BA=_tuples(x_raw),
        x_error_BA=_tuples(x_err), x_reward_BA=_tuples(x_rew), judge_stats=sum_stats(parts))


def build_tree(seeds: Sequence, config: GameConfig, *, judge: Judge, defender: Sampler,
               defender_tokenizer: Any, attacker: Optional[Sampler] = None,
               attacker_tokenizer: Any = None, skip_attacker: bool = False,
               sample_index: int = 0) -> ScoredTree:
    """Play one batch of seeds (objects with ``.prompt`` and ``.category``) to a ScoredTree.

    ``skip_attacker=True`` (validation): the defender answers each seed directly (A = 1,
    x = s; no faithfulness check, no attacker judge, attacker rewards 0.0).
    ``sample_index`` shifts the samplers' seeds (attacker ``seed + 2i``, defender
    ``seed + 2i + 1``): pass a different value per call, e.g. ``2 * step + split``.
    Judge statistics: each stage returns its part; the tree's ``judge_stats`` is their sum.
    """
    tree, faith = _sample(seeds, config, judge, defender, defender_tokenizer, attacker,
                          attacker_tokenizer, skip_attacker, sample_index)
    return score_tree(tree, config, judge=judge, sample_stats=faith)
