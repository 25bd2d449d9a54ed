"""Building the rollout tree of one batch of seeds (GAME_SPEC §2.2–2.9).

``sample_tree`` runs the attacker (one ``generate`` call, n = A, over all B seeds), parses the
attacks, checks faithfulness (one judge call over every valid x × ``num_faith_samples``) and
runs the defender (one ``generate`` call, n = D, over all valid x). ``score_tree`` runs the
defender judge (one call), selects the response each attack is judged on, runs the attacker
judge (one call) and patches rewards. ``build_tree`` does both. A stage with nothing to do
makes no call. Judge exceptions and malformed judge results become None results (and the
spec's BAD_*_JUDGE errors), counted as ``judge_exception`` in the tree's judge faults; a
sampler that breaks its contract raises, since no error value can stand for missing samples.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any, Optional, Sequence

from advgame_jax.game import rewards
from advgame_jax.game.config import GameConfig
from advgame_jax.game.judge import FaithRequest, Judge, PairRequest, PointRequest
from advgame_jax.game.parsing import faith_majority, parse_attack, stopped_early
from advgame_jax.game.templates import attacker_rubric, defender_rubric, get_template_set
from advgame_jax.game.tree import JudgeStats, RolloutTree, ScoredTree, XError, YError
from advgame_jax.sampling.base import Sampler, SamplingParams
from advgame_jax.types import as_ids

log = logging.getLogger(__name__)
STAGES = ("faith", "defender", "attacker")


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


def _finite(v) -> Optional[float]:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class _Calls:
    """Guarded judge calls and their per-stage bookkeeping."""

    def __init__(self, judge: Judge):
        self.judge = judge
        self.requests = {s: 0 for s in STAGES}
        self.failures = {s: 0 for s in STAGES}
        self.order_pairs = {s: 0 for s in STAGES}
        self.order_flips = {s: 0 for s in STAGES}
        self.exceptions = 0
        self.start_faults = self._faults()

    def _faults(self) -> dict:
        fn = getattr(self.judge, "fault_counts", None)
        try:
            return dict(fn()) if fn else {}
        except Exception:
            return {}

    def call(self, method: str, stage: str, requests: list, failed) -> list:
        if not requests:
            return []
        self.requests[stage] += len(requests)
        try:
            out = list(getattr(self.judge, method)(requests))
            if len(out) != len(requests):
                raise ValueError(f"judge.{method} returned {len(out)} results for {len(requests)} requests")
        except Exception as err:  # a judge fault must not end the step (GAME_SPEC error values)
            log.warning("judge.%s failed for %d requests: %s", method, len(requests), type(err).__name__)
            self.exceptions += 1
            out = [failed] * len(requests)
        return out

    def stats(self) -> JudgeStats:
        end = self._faults()
        faults = {k: end[k] - self.start_faults.get(k, 0) for k in end
                  if end[k] - self.start_faults.get(k, 0) > 0}
        if self.exceptions:
            faults["judge_exception"] = self.exceptions
        return JudgeStats(dict(self.requests), dict(self.failures), dict(self.order_pairs),
                          dict(self.order_flips), dict(sorted(faults.items())))


def _score_groups(calls: _Calls, stage: str, groups: list, config: GameConfig) -> list:
    """Judge groups of responses; ``groups[i] = (rubric, query, [response, ...])``.

    Returns, per group and response, the list of parsed scores it received. Pairwise: all
    pairs i < j (a lone response is compared with itself), both orders with swap_positions.
    """
    scores = [[[] for _ in g[2]] for g in groups]
    if config.judge_mode == "pointwise":
        where, reqs = [], []
        for gi, (rubric, query, resps) in enumerate(groups):
            for i, r in enumerate(resps):
                where.append((gi, i))
                reqs.append(PointRequest(rubric, query, r))
        results = [_finite(v) if v is not None else None for v in
                   calls.call("pointwise", stage, reqs, None)]
        for (gi, i), v in zip(where, results):
            if v is None:
                calls.failures[stage] += 1
            else:
                scores[gi][i].append(v)
        return scores

    where, reqs = [], []
    for gi, (rubric, query, resps) in enumerate(groups):
        n = len(resps)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)] if n > 1 else [(0, 0)] * n
        for i, j in pairs:
            orders = (False, True) if config.swap_positions else (False,)
            for swapped in orders:
                first, second = (j, i) if swapped else (i, j)
                where.append((gi, i, j, swapped))
                reqs.append(PairRequest(rubric, query, resps[first], resps[second]))
    results = calls.call("pairwise", stage, reqs, (None, None))
    by_pair = collections.defaultdict(dict)
    for (gi, i, j, swapped), res in zip(where, results):
        try:
            sa, sb = res
        except (TypeError, ValueError):
            sa = sb = None
        sa = None if sa is None else _finite(sa)
        sb = None if sb is None else _finite(sb)
        first, second = (j, i) if swapped else (i, j)
        if sa is None or sb is None:
            calls.failures[stage] += 1
        if sa is not None:
            scores[gi][first].append(sa)
        if sb is not None:
            scores[gi][second].append(sb)
        by_pair[(gi, i, j)][swapped] = (sa, sb)
    if config.swap_positions:
        for (gi, i, j), orders in by_pair.items():
            (sa1, sb1), (sa2, sb2) = orders[False], orders[True]
            if i == j or None in (sa1, sb1, sa2, sb2):
                continue
            sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
            calls.order_pairs[stage] += 1
            # Preference for response i: position A in the first order, position B in the second.
            calls.order_flips[stage] += sign(sa1 - sb1) != sign(sb2 - sa2)
    return scores


def _mean(vals: Sequence[float]) -> Optional[float]:
    return sum(vals) / len(vals) if vals else None


def sample_tree(seeds: Sequence, config: GameConfig, *, judge: Judge, defender: Sampler,
                defender_tokenizer: Any, attacker: Optional[Sampler] = None,
                attacker_tokenizer: Any = None, skip_attacker: bool = False,
                sample_index: int = 0, _calls: Optional[_Calls] = None) -> RolloutTree:
    """Sample attacks, check faithfulness and sample responses (see module docstring)."""
    templates = get_template_set(config.templates)
    calls = _calls or _Calls(judge)
    s_B = tuple(str(s.prompt) for s in seeds)
    cat_B = tuple(str(s.category) for s in seeds)
    for c in cat_B:
        if c not in ("harmful", "benign"):
            raise ValueError(f"seed category must be 'harmful' or 'benign', got {c!r}")
    B = len(s_B)
    A = 1 if skip_attacker else config.num_attacks
    D = config.num_responses

    if skip_attacker:
        att_prompt = tuple(() for _ in range(B))
        att_text = tuple(("",) for _ in range(B))
        att_ids = tuple(((),) for _ in range(B))
        att_lp = tuple(((),) for _ in range(B))
        att_finish = tuple((None,) for _ in range(B))
        x = [[s] for s in s_B]
        x_err = [[None] for _ in range(B)]
    else:
        if attacker is None or attacker_tokenizer is None:
            raise ValueError("build_tree: attacker and attacker_tokenizer are required unless skip_attacker=True")
        att_prompt = tuple(as_ids(attacker_tokenizer.render_user_turn(
            templates.attacker_prompt(s, c, config.attacker_format))) for s, c in zip(s_B, cat_B))
        params = _params(config.attacker_sampling, A, attacker_tokenizer, 2 * sample_index)
        comps = _generate(attacker, list(att_prompt), params, "attacker") if B else []
        grid = [comps[b * A:(b + 1) * A] for b in range(B)]
        att_text = tuple(tuple(c.text for c in row) for row in grid)
        att_ids = tuple(tuple(as_ids(c.token_ids) for c in row) for row in grid)
        att_lp = tuple(tuple(tuple(float(v) for v in c.logprobs) for c in row) for row in grid)
        att_finish = tuple(tuple(c.finish_reason for c in row) for row in grid)
        x = [[None] * A for _ in range(B)]
        x_err = [[None] * A for _ in range(B)]
        for b in range(B):
            for a, c in enumerate(grid[b]):
                if stopped_early(c.finish_reason):
                    x_err[b][a] = XError.MAX_LENGTH
                    continue
                x[b][a] = parse_attack(c.text, config.attacker_format)
                if x[b][a] is None:
                    x_err[b][a] = XError.PARSING

    votes = [[() for _ in range(A)] for _ in range(B)]
    if config.faithfulness and not skip_attacker:
        slots = [(b, a) for b in range(B) for a in range(A) if x_err[b][a] is None]
        k = config.num_faith_samples
        reqs = [FaithRequest(s_B[b], x[b][a], cat_B[b]) for b, a in slots for _ in range(k)]
        verdicts = calls.call("faithfulness", "faith", reqs, None)
        for i, (b, a) in enumerate(slots):
            vs = tuple(v if isinstance(v, bool) else None for v in verdicts[i * k:(i + 1) * k])
            votes[b][a] = vs
            calls.failures["faith"] += sum(v is None for v in vs)
            verdict = faith_majority(vs, config.faith_tie)
            if verdict is None:
                x_err[b][a] = XError.BAD_FAITH_JUDGE
            elif not verdict:
                x_err[b][a] = XError.NOT_FAITHFUL

    valid = [(b, a) for b in range(B) for a in range(A) if x_err[b][a] is None]
    def_prompt = [[() for _ in range(A)] for _ in range(B)]
    for b, a in valid:
        def_prompt[b][a] = as_ids(defender_tokenizer.render_user_turn(templates.defender_prompt(x[b][a])))
    empty = ("", None, (), (), None, YError.PROMPT_NOT_VALID)
    y = [[[empty] * D for _ in range(A)] for _ in range(B)]
    if valid:
        params = _params(config.defender_sampling, D, defender_tokenizer, 2 * sample_index + 1)
        comps = _generate(defender, [def_prompt[b][a] for b, a in valid], params, "defender")
        for i, (b, a) in enumerate(valid):
            for d, c in enumerate(comps[i * D:(i + 1) * D]):
                resp, err = None, None
                if stopped_early(c.finish_reason):
                    err = YError.MAX_LENGTH
                else:
                    resp = parse_attack(c.text, config.defender_format)
                    err = YError.PARSING if resp is None else None
                y[b][a][d] = (c.text, resp, as_ids(c.token_ids), tuple(float(v) for v in c.logprobs),
                              c.finish_reason, err)
            if all(y[b][a][d][5] is not None for d in range(D)):
                x_err[b][a] = XError.NO_VALID_RESPONSE

    def field(k):
        return tuple(tuple(tuple(y[b][a][d][k] for d in range(D)) for a in range(A)) for b in range(B))

    return RolloutTree(
        s_B=s_B, category_B=cat_B, skip_attacker=skip_attacker, att_prompt_ids_B=att_prompt,
        att_text_BA=att_text, att_ids_BA=att_ids, att_logprobs_BA=att_lp, att_finish_BA=att_finish,
        x_BA=tuple(tuple(r) for r in x), faith_votes_BA=tuple(tuple(r) for r in votes),
        x_error_BA=tuple(tuple(r) for r in x_err),
        def_prompt_ids_BA=tuple(tuple(r) for r in def_prompt),
        y_text_BAD=field(0), y_response_BAD=field(1), y_ids_BAD=field(2), y_logprobs_BAD=field(3),
        y_finish_BAD=field(4), y_error_BAD=field(5))


def score_tree(tree: RolloutTree, config: GameConfig, *, judge: Judge,
               _calls: Optional[_Calls] = None) -> ScoredTree:
    """Defender judge → response selection → attacker judge → patched rewards."""
    calls = _calls or _Calls(judge)
    B, A, D = tree.shape
    att_judge_on = config.attacker_judge_enabled and not tree.skip_attacker
    y_err = [[list(r) for r in rows] for rows in tree.y_error_BAD]
    x_err = [list(r) for r in tree.x_error_BA]

    y_scores = [[[() for _ in range(D)] for _ in range(A)] for _ in range(B)]
    y_raw = [[[None] * D for _ in range(A)] for _ in range(B)]
    if config.defender_judge_enabled:
        groups, where = [], []
        for b in range(B):
            for a in range(A):
                cands = [d for d in range(D) if x_err[b][a] is None and y_err[b][a][d] is None]
                if cands:
                    query = tree.x_BA[b][a] if config.condition_on == "prompt" else tree.s_B[b]
                    groups.append((defender_rubric(tree.category_B[b]), query,
                                   [tree.y_response_BAD[b][a][d] for d in cands]))
                    where.append((b, a, cands))
        for (b, a, cands), per in zip(where, _score_groups(calls, "defender", groups, config)):
            for d, vals in zip(cands, per):
                y_scores[b][a][d] = tuple(vals)
                y_raw[b][a][d] = _mean(vals)
                if not vals:
                    y_err[b][a][d] = YError.BAD_DEF_JUDGE
    y_rew = [[[rewards.patch_y_reward(y_err[b][a][d], y_raw[b][a][d], config.defender_judge_enabled)
               for d in range(D)] for a in range(A)] for b in range(B)]

    selected = [[None] * A for _ in range(B)]
    # Reference rule: an attack whose selected response has no defender judgment
    # (BAD_DEF_JUDGE) is not sent to the attacker judge; it keeps reward 0.0.
    unjudged = set()
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

    x_scores = [[() for _ in range(A)] for _ in range(B)]
    x_raw = [[None] * A for _ in range(B)]
    if att_judge_on:
        groups, where = [], []
        for b in range(B):
            cands = [a for a in range(A) if x_err[b][a] is None and (b, a) not in unjudged]
            if cands:
                groups.append((attacker_rubric(tree.category_B[b]), tree.s_B[b],
                               [tree.y_response_BAD[b][a][selected[b][a]] for a in cands]))
                where.append((b, cands))
        for (b, cands), per in zip(where, _score_groups(calls, "attacker", groups, config)):
            for a, vals in zip(cands, per):
                x_scores[b][a] = tuple(vals)
                x_raw[b][a] = _mean(vals)
                if not vals:
                    x_err[b][a] = XError.BAD_ATT_JUDGE
    x_rew = [[0.0 if (b, a) in unjudged and x_err[b][a] is None
              else rewards.patch_x_reward(x_err[b][a], x_raw[b][a], att_judge_on)
              for a in range(A)] for b in range(B)]

    def t3(v):
        return tuple(tuple(tuple(r) for r in rows) for rows in v)

    return ScoredTree(
        tree=tree, config=config, y_judge_scores_BAD=t3(y_scores), y_raw_reward_BAD=t3(y_raw),
        y_error_BAD=t3(y_err), y_reward_BAD=t3(y_rew), selected_d_BA=tuple(tuple(r) for r in selected),
        x_judge_scores_BA=t3(x_scores), x_raw_reward_BA=tuple(tuple(r) for r in x_raw),
        x_error_BA=tuple(tuple(r) for r in x_err), x_reward_BA=tuple(tuple(r) for r in x_rew),
        judge_stats=calls.stats())


def build_tree(seeds: Sequence, config: GameConfig, *, judge: Judge, defender: Sampler,
               defender_tokenizer: Any, attacker: Optional[Sampler] = None,
               attacker_tokenizer: Any = None, skip_attacker: bool = False,
               sample_index: int = 0) -> ScoredTree:
    """Play one batch of seeds (objects with ``.prompt`` and ``.category``) to a ScoredTree.

    ``skip_attacker=True`` (validation): the defender answers each seed directly (A = 1,
    x = s; no faithfulness check, no attacker judge, attacker rewards 0.0).
    ``sample_index`` shifts the samplers' seeds (attacker ``seed + 2i``, defender
    ``seed + 2i + 1``): pass a different value per call, e.g. ``2 * step + split``.
    """
    calls = _Calls(judge)
    tree = sample_tree(seeds, config, judge=judge, defender=defender,
                       defender_tokenizer=defender_tokenizer, attacker=attacker,
                       attacker_tokenizer=attacker_tokenizer, skip_attacker=skip_attacker,
                       sample_index=sample_index, _calls=calls)
    return score_tree(tree, config, judge=judge, _calls=calls)
