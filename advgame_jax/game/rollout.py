"""Building the rollout tree of one batch of seeds (GAME_SPEC §2.2–2.9).

``sample_tree`` runs the attacker (one ``generate`` call, n = A, over all B seeds), parses the
attacks, checks faithfulness (one judge call over every valid x × ``num_faith_samples``) and
runs the defender (one ``generate`` call, n = D, over all valid x). ``score_tree`` runs the
defender judge (one call), selects the response each attack is judged on, runs the attacker
judge (one call) and patches rewards. ``build_tree`` does both. A stage with nothing to do
makes no call. Judge exceptions and malformed judge results become None results (and the
spec's BAD_*_JUDGE errors), counted as ``judge_exception`` in the tree's judge faults; a
sampler that breaks its contract raises, since no error value can stand for missing samples.

The tree's slots (``game.tree``) are filled stage by stage: sampling makes the attack and
response records, each judge stage returns a new record per slot with its scores, error and
patched reward (``dataclasses.replace``; records are frozen). Each judge stage
returns its results with its ``JudgeStats`` part (``game.judging``); the tree's
``judge_stats`` is their sum. ``sample_tree`` alone drops the faithfulness part;
``build_tree`` passes it to ``score_tree(sample_stats=...)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, cast

from advgame_jax.game import rewards
from advgame_jax.game.config import GameConfig
from advgame_jax.game.judge import FaithRequest, Judge
from advgame_jax.game.judging import (
    STAGES,
    JudgeGroup,
    call_judge,
    judge_groups,
    stage_stats,
    sum_stats,
)
from advgame_jax.game.parsing import faith_majority, parse_attack, stopped_early
from advgame_jax.game.templates import attacker_rubric, defender_rubric, get_template_set
from advgame_jax.game.tree import (
    AttackSlot,
    JudgeStats,
    ResponseSlot,
    RolloutTree,
    ScoredTree,
    SeedSlot,
    XError,
    YError,
)
from advgame_jax.sampling.base import Generator, SamplingParams
from advgame_jax.types import as_ids

__all__ = ["STAGES", "build_tree", "sample_tree", "score_tree"]


def _params(base: SamplingParams, n: int, tokenizer: Any, seed_offset: int) -> SamplingParams:
    stop = base.stop_token_ids or tuple(getattr(tokenizer, "stop_token_ids", ()) or ())
    return dataclasses.replace(
        base, n=n, stop_token_ids=tuple(int(t) for t in stop), seed=base.seed + seed_offset
    )


def _generate(sampler: Generator, prompts: list, params: SamplingParams, who: str):
    out = list(sampler.generate(prompts, params))
    if len(out) != len(prompts) * params.n:
        raise ValueError(
            f"{who} sampler returned {len(out)} completions for {len(prompts)} "
            f"prompts × n={params.n}"
        )
    return out


_UNSAMPLED = ResponseSlot()


def _sample_attacks(s_B, cat_B, config, templates, attacker, attacker_tokenizer, sample_index):
    """Attacker prompts per seed and the [B][A] grid of parsed attack slots."""
    A = config.num_attacks
    prompts = tuple(
        as_ids(
            attacker_tokenizer.render_user_turn(
                templates.attacker_prompt(s, c, config.attacker_format)
            )
        )
        for s, c in zip(s_B, cat_B, strict=True)
    )
    params = _params(config.attacker_sampling, A, attacker_tokenizer, 2 * sample_index)
    comps = _generate(attacker, list(prompts), params, "attacker") if s_B else []
    grid = []
    for b in range(len(s_B)):
        row = []
        for c in comps[b * A : (b + 1) * A]:
            x, err = None, None
            if stopped_early(c.finish_reason):
                err = XError.MAX_LENGTH
            else:
                x = parse_attack(c.text, config.attacker_format)
                err = XError.PARSING if x is None else None
            row.append(
                AttackSlot(
                    c.text,
                    as_ids(c.token_ids),
                    tuple(float(v) for v in c.logprobs),
                    c.finish_reason,
                    x,
                    err,
                )
            )
        grid.append(row)
    return prompts, grid


def _check_faithfulness(judge, config, s_B, cat_B, att) -> JudgeStats:
    """Faithfulness votes of every valid attack slot of ``att`` ([B][A], updated in place),
    with NOT_FAITHFUL / BAD_FAITH_JUDGE set from their majority."""
    slots = [(b, a) for b, row in enumerate(att) for a, t in enumerate(row) if t.error is None]
    k = config.num_faith_samples
    reqs = [FaithRequest(s_B[b], att[b][a].x, cat_B[b]) for b, a in slots for _ in range(k)]
    verdicts, part = call_judge(judge, "faithfulness", "faith", reqs, None)
    failures = 0
    for i, (b, a) in enumerate(slots):
        vs = tuple(v if isinstance(v, bool) else None for v in verdicts[i * k : (i + 1) * k])
        failures += sum(v is None for v in vs)
        verdict = faith_majority(vs, config.faith_tie)
        error = (
            XError.BAD_FAITH_JUDGE if verdict is None else None if verdict else XError.NOT_FAITHFUL
        )
        att[b][a] = dataclasses.replace(att[b][a], faith_votes=vs, error=error)
    return dataclasses.replace(part, failures={"faith": failures})


def _parsed_response(c, config) -> ResponseSlot:
    resp, err = None, None
    if stopped_early(c.finish_reason):
        err = YError.MAX_LENGTH
    else:
        resp = parse_attack(c.text, config.defender_format)
        err = YError.PARSING if resp is None else None
    return ResponseSlot(
        c.text, resp, as_ids(c.token_ids), tuple(float(v) for v in c.logprobs), c.finish_reason, err
    )


def _sample_responses(config, templates, att, defender, defender_tokenizer, sample_index) -> None:
    """Defender prompt and D response slots for every attack of ``att`` ([B][A], updated in
    place; an invalid attack gets D unsampled slots); an attack none of whose responses is
    usable gets NO_VALID_RESPONSE."""
    D = config.num_responses
    valid = [(b, a) for b, row in enumerate(att) for a, t in enumerate(row) if t.error is None]
    for row in att:
        row[:] = [dataclasses.replace(t, responses=(_UNSAMPLED,) * D) for t in row]
    if not valid:
        return
    prompts = [
        as_ids(defender_tokenizer.render_user_turn(templates.defender_prompt(att[b][a].x)))
        for b, a in valid
    ]
    params = _params(config.defender_sampling, D, defender_tokenizer, 2 * sample_index + 1)
    comps = _generate(defender, prompts, params, "defender")
    for i, (b, a) in enumerate(valid):
        responses = tuple(_parsed_response(c, config) for c in comps[i * D : (i + 1) * D])
        error = XError.NO_VALID_RESPONSE if all(r.error is not None for r in responses) else None
        att[b][a] = dataclasses.replace(
            att[b][a], prompt_ids=prompts[i], responses=responses, error=error
        )


@dataclasses.dataclass(frozen=True)
class TreePlayers:
    """Who plays one batch: the judge, the defender's sampler and tokenizer, and the
    attacker's (required unless the attacker is skipped)."""

    judge: Judge
    defender: Generator
    defender_tokenizer: Any
    attacker: Optional[Generator] = None
    attacker_tokenizer: Any = None


def _tree_players(players: Optional[TreePlayers], fields: dict) -> TreePlayers:
    """``players``, or one built from the keywords (``judge=…, defender=…``) naming them."""
    if players is None:
        return TreePlayers(**fields)
    if fields:
        raise TypeError(f"players given twice: as TreePlayers and as keywords {sorted(fields)}")
    return players


def _check_categories(cat_B) -> None:
    for c in cat_B:
        if c not in ("harmful", "benign"):
            raise ValueError(f"seed category must be 'harmful' or 'benign', got {c!r}")


def _sample(
    seeds, config, players: TreePlayers, skip_attacker, sample_index
) -> tuple[RolloutTree, JudgeStats]:
    templates = get_template_set(config.templates)
    s_B = tuple(str(s.prompt) for s in seeds)
    cat_B = tuple(str(s.category) for s in seeds)
    _check_categories(cat_B)
    if skip_attacker:
        att_prompt = tuple(() for _ in s_B)
        att = [[AttackSlot("", (), (), None, s, None)] for s in s_B]
    else:
        if players.attacker is None or players.attacker_tokenizer is None:
            raise ValueError(
                "build_tree: attacker and attacker_tokenizer are required unless skip_attacker=True"
            )
        att_prompt, att = _sample_attacks(
            s_B,
            cat_B,
            config,
            templates,
            players.attacker,
            players.attacker_tokenizer,
            sample_index,
        )
    if config.faithfulness and not skip_attacker:
        faith = _check_faithfulness(players.judge, config, s_B, cat_B, att)
    else:
        faith = stage_stats("faith")
    _sample_responses(
        config, templates, att, players.defender, players.defender_tokenizer, sample_index
    )
    tree = RolloutTree(
        tuple(
            SeedSlot(s, c, p, tuple(row))
            for s, c, p, row in zip(s_B, cat_B, att_prompt, att, strict=True)
        ),
        skip_attacker,
    )
    return tree, faith


def sample_tree(
    seeds: Sequence,
    config: GameConfig,
    players: Optional[TreePlayers] = None,
    *,
    skip_attacker: bool = False,
    sample_index: int = 0,
    **player_fields: Any,
) -> RolloutTree:
    """Sample attacks, check faithfulness and sample responses (see module docstring).
    The players come as ``players`` or as its fields by keyword (``judge=…, defender=…``)."""
    return _sample(
        seeds, config, _tree_players(players, player_fields), skip_attacker, sample_index
    )[0]


def _judged(slot, scores: Optional[tuple], bad):
    """``slot`` with the scores it received (None: not judged) and their mean; a judged slot
    without any parsed score gets the error ``bad``."""
    if scores is None:
        return slot
    return dataclasses.replace(
        slot,
        judge_scores=scores,
        raw_reward=sum(scores) / len(scores) if scores else None,
        error=slot.error if scores else bad,
    )


def _defender_groups(tree: RolloutTree, config: GameConfig) -> list[JudgeGroup]:
    """One group per valid attack: its error-free responses, judged against x (or s)."""
    groups = []
    for b, a, att in tree.attacks():
        cands = [d for d, r in enumerate(att.responses) if r.error is None]
        if att.error is None and cands:
            seed = tree.seeds[b]
            # An attack or response without an error holds its text (x, y are not None).
            query = cast(str, att.x) if config.condition_on == "prompt" else seed.s
            groups.append(
                JudgeGroup(
                    defender_rubric(seed.category),
                    query,
                    tuple((b, a, d) for d in cands),
                    tuple(cast(str, att.responses[d].y) for d in cands),
                )
            )
    return groups


def _attacker_groups(seeds: Sequence[SeedSlot], config: GameConfig) -> list[JudgeGroup]:
    """One group per seed: the selected response of each valid, judged attack, against s."""
    groups = []
    for b, seed in enumerate(seeds):
        cands = [
            a
            for a, att in enumerate(seed.attacks)
            if att.error is None and not rewards.left_unjudged(att, config.selection)
        ]
        if cands:
            # A valid attack has a selected response, and that response's text.
            groups.append(
                JudgeGroup(
                    attacker_rubric(seed.category),
                    seed.s,
                    tuple((b, a) for a in cands),
                    tuple(
                        cast(str, att.responses[cast(int, att.selected_d)].y)
                        for att in (seed.attacks[a] for a in cands)
                    ),
                )
            )
    return groups


def _judge_defender_side(
    att: AttackSlot, b: int, a: int, verdicts: dict, config: GameConfig
) -> AttackSlot:
    """``att`` with its responses judged and patched, and the response it is judged on."""
    sampled_ok = [r.error is None for r in att.responses]
    responses = []
    for d, r in enumerate(att.responses):
        r = _judged(r, verdicts.get((b, a, d)), YError.BAD_DEF_JUDGE)
        responses.append(
            dataclasses.replace(
                r, reward=rewards.patch_reward(r.error, r.raw_reward, config.defender_judge_enabled)
            )
        )
    selected = None
    if att.error is None:
        judged = [r.reward if r.error is None else None for r in responses]
        selected = rewards.select_response(sampled_ok, judged, config.optimistic_attacker)
    return dataclasses.replace(att, responses=tuple(responses), selected_d=selected)


def score_tree(
    tree: RolloutTree,
    config: GameConfig,
    *,
    judge: Judge,
    sample_stats: Optional[JudgeStats] = None,
) -> ScoredTree:
    """Defender judge → response selection → attacker judge → patched rewards.

    ``sample_stats``: judge statistics of the sampling stages, added to the tree's.
    """
    att_judge_on = config.attacker_judge_enabled and not tree.skip_attacker
    parts = [sample_stats] if sample_stats is not None else []

    verdicts: dict = {}
    if config.defender_judge_enabled:
        verdicts, part = judge_groups(judge, "defender", _defender_groups(tree, config), config)
        parts.append(part)
    seeds = [
        dataclasses.replace(
            seed,
            attacks=tuple(
                _judge_defender_side(att, b, a, verdicts, config)
                for a, att in enumerate(seed.attacks)
            ),
        )
        for b, seed in enumerate(tree.seeds)
    ]

    verdicts = {}
    if att_judge_on:
        verdicts, part = judge_groups(judge, "attacker", _attacker_groups(seeds, config), config)
        parts.append(part)
    for b, seed in enumerate(seeds):
        attacks = []
        for a, att in enumerate(seed.attacks):
            att = _judged(att, verdicts.get((b, a)), XError.BAD_ATT_JUDGE)
            attacks.append(
                dataclasses.replace(
                    att, reward=rewards.attack_reward(att, config.selection, att_judge_on)
                )
            )
        seeds[b] = dataclasses.replace(seed, attacks=tuple(attacks))

    return ScoredTree(tuple(seeds), tree.skip_attacker, config=config, judge_stats=sum_stats(parts))


def build_tree(
    seeds: Sequence,
    config: GameConfig,
    players: Optional[TreePlayers] = None,
    *,
    skip_attacker: bool = False,
    sample_index: int = 0,
    **player_fields: Any,
) -> ScoredTree:
    """Play one batch of seeds (objects with ``.prompt`` and ``.category``) to a ScoredTree.

    The players come as ``players`` or as the :class:`TreePlayers` fields by keyword
    (``judge=…, defender=…, defender_tokenizer=…, attacker=…, attacker_tokenizer=…``).
    ``skip_attacker=True`` (validation): the defender answers each seed directly (A = 1,
    x = s; no faithfulness check, no attacker judge, attacker rewards 0.0).
    ``sample_index`` shifts the samplers' seeds (attacker ``seed + 2i``, defender
    ``seed + 2i + 1``): pass a different value per call, e.g. ``2 * step + split``.
    Judge statistics: each stage returns its part; the tree's ``judge_stats`` is their sum.
    """
    players = _tree_players(players, player_fields)
    tree, faith = _sample(seeds, config, players, skip_attacker, sample_index)
    return score_tree(tree, config, judge=players.judge, sample_stats=faith)
