"""The rollout tree (GAME_SPEC §2): error enums, the sampled ``RolloutTree``, the judged
``ScoredTree``, and their JSON-able dict form (used by the audit log).

Shapes: ``B`` seeds, ``A`` attacks per seed, ``D`` responses per attack. ``*_B`` fields are
tuples of length B, ``*_BA`` tuples of B tuples of length A, ``*_BAD`` B×A×D nested tuples.
Token ids are the exact ids the samplers produced (``prompt`` ids are the chat-templated
inputs, completion ids the raw outputs), so preference pairs need no re-tokenisation.
Slots that were never sampled (the D responses of an invalid attack, the attacker side in
``skip_attacker`` mode) hold ``""`` / ``()`` / ``None``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterable, Optional

from advgame_jax.game.config import GameConfig

Ids = tuple[int, ...]


class XError(str, enum.Enum):
    """Why an attack slot has no judge reward (GAME_SPEC §2.3–2.8)."""

    MAX_LENGTH = "MAX_LENGTH"
    PARSING = "PARSING"
    NOT_FAITHFUL = "NOT_FAITHFUL"
    BAD_FAITH_JUDGE = "BAD_FAITH_JUDGE"
    NO_VALID_RESPONSE = "NO_VALID_RESPONSE"
    BAD_ATT_JUDGE = "BAD_ATT_JUDGE"


class YError(str, enum.Enum):
    """Why a response slot has no judge reward (GAME_SPEC §2.5–2.6)."""

    MAX_LENGTH = "MAX_LENGTH"
    PARSING = "PARSING"
    PROMPT_NOT_VALID = "PROMPT_NOT_VALID"
    BAD_DEF_JUDGE = "BAD_DEF_JUDGE"


@dataclasses.dataclass(frozen=True)
class RolloutTree:
    """Everything sampled for one batch of seeds, before the defender and attacker judges.

    s_B, category_B: seed prompts and categories ("harmful" | "benign").
    skip_attacker: True when the defender answered the seeds directly (A = 1, x = s).
    att_prompt_ids_B: templated attacker input per seed.
    att_text_BA / att_ids_BA / att_logprobs_BA / att_finish_BA: raw attacker outputs
      (think part included), their ids, sampler log-probs and finish reason.
    x_BA: the parsed attack (None when the output did not parse or hit the length limit).
    faith_votes_BA: the parsed faithfulness verdict of each judge sample (None = unparsable).
    x_error_BA: error known after sampling (MAX_LENGTH, PARSING, NOT_FAITHFUL,
      BAD_FAITH_JUDGE, NO_VALID_RESPONSE) or None.
    def_prompt_ids_BA: templated defender input (() when x is not valid).
    y_text_BAD / y_ids_BAD / y_logprobs_BAD / y_finish_BAD: raw defender outputs.
    y_response_BAD: the response shown to judges (the parsed output; None on error).
    y_error_BAD: MAX_LENGTH, PARSING, PROMPT_NOT_VALID or None.
    """

    s_B: tuple[str, ...]
    category_B: tuple[str, ...]
    skip_attacker: bool
    att_prompt_ids_B: tuple[Ids, ...]
    att_text_BA: tuple[tuple[str, ...], ...]
    att_ids_BA: tuple[tuple[Ids, ...], ...]
    att_logprobs_BA: tuple[tuple[tuple[float, ...], ...], ...]
    att_finish_BA: tuple[tuple[Optional[str], ...], ...]
    x_BA: tuple[tuple[Optional[str], ...], ...]
    faith_votes_BA: tuple[tuple[tuple[Optional[bool], ...], ...], ...]
    x_error_BA: tuple[tuple[Optional[XError], ...], ...]
    def_prompt_ids_BA: tuple[tuple[Ids, ...], ...]
    y_text_BAD: tuple[tuple[tuple[str, ...], ...], ...]
    y_response_BAD: tuple[tuple[tuple[Optional[str], ...], ...], ...]
    y_ids_BAD: tuple[tuple[tuple[Ids, ...], ...], ...]
    y_logprobs_BAD: tuple[tuple[tuple[tuple[float, ...], ...], ...], ...]
    y_finish_BAD: tuple[tuple[tuple[Optional[str], ...], ...], ...]
    y_error_BAD: tuple[tuple[tuple[Optional[YError], ...], ...], ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, A, D)."""
        b = len(self.s_B)
        a = len(self.x_BA[0]) if b else 0
        d = len(self.y_error_BAD[0][0]) if b and a else 0
        return b, a, d


@dataclasses.dataclass(frozen=True)
class JudgeStats:
    """Judge bookkeeping of one tree; every dict is keyed by stage ("faith", "defender",
    "attacker") except ``faults`` (backend fault kind -> count during this tree).

    requests: judge requests sent; failures: requests whose result was unusable;
    order_pairs / order_flips: with swap_positions, distinct pairs judged in both orders with
    all four scores parsed, and how many of them changed the preferred side.
    """

    requests: dict
    failures: dict
    order_pairs: dict
    order_flips: dict
    faults: dict


def sum_judge_stats(parts: Iterable[JudgeStats], stages: Iterable[str] = ()) -> JudgeStats:
    """``parts`` summed key by key, keys in order of first appearance; every stage in
    ``stages`` is present (zero when no part has it)."""
    stages = tuple(stages)
    fields = [f.name for f in dataclasses.fields(JudgeStats) if f.name != "faults"]
    counts = {name: {s: 0 for s in stages} for name in fields}
    faults: dict = {}
    for part in parts:
        for name in fields:
            for stage, n in getattr(part, name).items():
                counts[name][stage] = counts[name].get(stage, 0) + n
        for kind, n in part.faults.items():
            faults[kind] = faults.get(kind, 0) + n
    return JudgeStats(**counts, faults=faults)


@dataclasses.dataclass(frozen=True)
class ScoredTree:
    """A judged tree with final errors, raw judge rewards and patched rewards.

    y_judge_scores_BAD / x_judge_scores_BA: every parsed judge score a slot received.
    y_raw_reward_BAD / x_raw_reward_BA: their mean (None when not judged or all unparsable).
    y_error_BAD / x_error_BA: final errors (adds BAD_DEF_JUDGE / BAD_ATT_JUDGE).
    selected_d_BA: index of the response the attacker was judged on (None for invalid x).
    y_reward_BAD / x_reward_BA: patched rewards (GAME_SPEC §2.9); None = excluded.
    """

    tree: RolloutTree
    config: GameConfig
    y_judge_scores_BAD: tuple[tuple[tuple[tuple[float, ...], ...], ...], ...]
    y_raw_reward_BAD: tuple[tuple[tuple[Optional[float], ...], ...], ...]
    y_error_BAD: tuple[tuple[tuple[Optional[YError], ...], ...], ...]
    y_reward_BAD: tuple[tuple[tuple[Optional[float], ...], ...], ...]
    selected_d_BA: tuple[tuple[Optional[int], ...], ...]
    x_judge_scores_BA: tuple[tuple[tuple[float, ...], ...], ...]
    x_raw_reward_BA: tuple[tuple[Optional[float], ...], ...]
    x_error_BA: tuple[tuple[Optional[XError], ...], ...]
    x_reward_BA: tuple[tuple[Optional[float], ...], ...]
    judge_stats: JudgeStats

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.tree.shape


def _deep_tuple(obj):
    if isinstance(obj, list):
        return tuple(_deep_tuple(o) for o in obj)
    return obj


def _map_nested(obj, fn):
    if isinstance(obj, (list, tuple)):
        return tuple(_map_nested(o, fn) for o in obj)
    return fn(obj)


def _plain(obj):
    """Tuples to lists, enums to their names: what ``json.dumps`` writes back identically."""
    if isinstance(obj, (list, tuple)):
        return [_plain(o) for o in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def rollout_tree_to_dict(tree: RolloutTree) -> dict:
    return {f.name: _plain(getattr(tree, f.name)) for f in dataclasses.fields(tree)}


def rollout_tree_from_dict(d: dict) -> RolloutTree:
    kw = {f.name: _deep_tuple(d[f.name]) for f in dataclasses.fields(RolloutTree)}
    kw["x_error_BA"] = _map_nested(kw["x_error_BA"], lambda v: None if v is None else XError(v))
    kw["y_error_BAD"] = _map_nested(kw["y_error_BAD"], lambda v: None if v is None else YError(v))
    return RolloutTree(**kw)


def scored_tree_to_dict(scored: ScoredTree) -> dict:
    out = {}
    for f in dataclasses.fields(scored):
        value = getattr(scored, f.name)
        if f.name == "tree":
            out[f.name] = rollout_tree_to_dict(value)
        elif f.name == "config":
            out[f.name] = _plain(value.to_dict())
        elif f.name == "judge_stats":
            out[f.name] = dataclasses.asdict(value)
        else:
            out[f.name] = _plain(value)
    return out


def scored_tree_from_dict(d: dict) -> ScoredTree:
    kw = {}
    for f in dataclasses.fields(ScoredTree):
        value = d[f.name]
        if f.name == "tree":
            kw[f.name] = rollout_tree_from_dict(value)
        elif f.name == "config":
            kw[f.name] = GameConfig.from_dict(value)
        elif f.name == "judge_stats":
            kw[f.name] = JudgeStats(**{k: dict(v) for k, v in value.items()})
        else:
            kw[f.name] = _deep_tuple(value)
    kw["x_error_BA"] = _map_nested(kw["x_error_BA"], lambda v: None if v is None else XError(v))
    kw["y_error_BAD"] = _map_nested(kw["y_error_BAD"], lambda v: None if v is None else YError(v))
    return ScoredTree(**kw)


def concat_scored_trees(trees: "list[ScoredTree]") -> ScoredTree:
    """One ``ScoredTree`` holding the seeds of ``trees`` in order (same A, D and config), with
    their judge statistics summed: how a split judged in several chunks is summarised whole."""
    if not trees:
        raise ValueError("concat_scored_trees: expected at least one tree")
    if len(trees) == 1:
        return trees[0]

    def cat(objs, name):
        if name.endswith(("_B", "_BA", "_BAD")):
            return tuple(v for o in objs for v in getattr(o, name))
        return getattr(objs[0], name)

    rollouts = [t.tree for t in trees]
    tree = RolloutTree(**{f.name: cat(rollouts, f.name) for f in dataclasses.fields(RolloutTree)})

    stats = sum_judge_stats(t.judge_stats for t in trees)
    fields = {f.name: cat(trees, f.name) for f in dataclasses.fields(ScoredTree)
              if f.name not in ("tree", "judge_stats")}
    return ScoredTree(tree=tree, judge_stats=stats, **fields)
