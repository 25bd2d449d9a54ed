"""From judged slots to training signal: reward patching (GAME_SPEC §2.9), selection of the
response the attacker is judged on (§2.7), preference pairs (§2.10) and GRPO advantages
(§2.11), each written once for both players.

A player's samples come in groups (``groups``): the attacker has one group per seed (its A
attacks, prompted by the templated seed), the defender one group per attack (its D
responses, prompted by the templated x). Pairs are formed within a group; the GRPO baseline
pools every sample of a seed. The records emitted for training are ``advgame_jax.types``'s.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from advgame_jax.game.tree import AttackSlot, Ids, ResponseSlot, ScoredTree, XError, YError
from advgame_jax.types import TokenPair, TokenSample, as_ids

PENALTY = -1.0
BASELINES = ("across_seeds", "per_seed")
PLAYERS = ("attacker", "defender")
Error = Union[XError, YError]
Slot = Union[AttackSlot, ResponseSlot]
# Errors of the player's own making get −1; judge-side errors and unsampled slots are excluded.
_PENALISED = frozenset(
    {XError.MAX_LENGTH, XError.PARSING, XError.NOT_FAITHFUL, YError.MAX_LENGTH, YError.PARSING}
)
_LENGTH_STOPPED = frozenset({XError.MAX_LENGTH, YError.MAX_LENGTH})


def patch_reward(
    error: Optional[Error], raw: Optional[float], judge_enabled: bool
) -> Optional[float]:
    """Reward of one slot of either player: the judge score (0.0 with the judge off) when
    error-free; −1 for MAX_LENGTH / PARSING / NOT_FAITHFUL; None (excluded) for the others
    (BAD_FAITH_JUDGE, NO_VALID_RESPONSE, BAD_ATT_JUDGE, PROMPT_NOT_VALID, BAD_DEF_JUDGE)."""
    if error is None:
        if not judge_enabled:
            return 0.0
        if raw is None:
            raise ValueError("an error-free slot judged by an enabled judge must have a raw reward")
        return float(raw)
    if error in _PENALISED:
        return PENALTY
    return None


def left_unjudged(attack: AttackSlot, selection: str) -> bool:
    """The reference rule (``selection="reference"``): an attack whose selected response got
    BAD_DEF_JUDGE is not sent to the attacker judge and keeps reward 0.0."""
    d = attack.selected_d
    return (
        selection == "reference"
        and d is not None
        and attack.responses[d].error == YError.BAD_DEF_JUDGE
    )


def attack_reward(attack: AttackSlot, selection: str, judge_enabled: bool) -> Optional[float]:
    """The patched reward of a judged attack slot (``patch_reward`` and the reference rule)."""
    if attack.error is None and left_unjudged(attack, selection):
        return 0.0
    return patch_reward(attack.error, attack.raw_reward, judge_enabled)


def _argbest(values: Sequence[Optional[float]], better) -> Optional[int]:
    best = None
    for i, v in enumerate(values):
        if v is not None and (best is None or better(v, values[best])):
            best = i
    return best


def argmax_first(values: Sequence[Optional[float]]) -> Optional[int]:
    """Index of the largest non-None value; the first one wins ties; None if all are None."""
    return _argbest(values, lambda a, b: a > b)


def argmin_first(values: Sequence[Optional[float]]) -> Optional[int]:
    return _argbest(values, lambda a, b: a < b)


def select_response(
    sampled_ok: Sequence[bool], judged_reward: Sequence[Optional[float]], optimistic: bool
) -> Optional[int]:
    """The response (index over D) the attacker is judged on, for one valid attack.

    ``sampled_ok[d]``: response d has no sampling error; ``judged_reward[d]``: its patched
    defender reward when it is error-free after judging, else None. Optimistic: argmax of the
    judged rewards (first wins ties); otherwise the first judged response. When no response
    survived judging (all BAD_DEF_JUDGE), the first response without a sampling error is
    used, so the attacker is still judged on what the defender said. None if nothing was
    sampled successfully.
    """
    judged = [r if ok else None for ok, r in zip(sampled_ok, judged_reward, strict=True)]
    if optimistic:
        pick = argmax_first(judged)
    else:
        pick = next((d for d, r in enumerate(judged) if r is not None), None)
    if pick is None:
        pick = next((d for d, ok in enumerate(sampled_ok) if ok), None)
    return pick


def preference(values: Sequence[Optional[float]]) -> Optional[tuple[int, int]]:
    """(chosen, rejected) = (argmax, argmin) of the non-None values, or None when they tie."""
    c, r = argmax_first(values), argmin_first(values)
    if c is None or r is None or values[c] == values[r]:  # both None or neither
        return None
    return c, r


@dataclasses.dataclass(frozen=True)
class Group:
    """Samples of one player under one prompt: seed ``b``'s attacks (``g`` = 0), or the
    responses to attack ``g`` of seed ``b``. ``pairable``: the group may give a pair."""

    b: int
    g: int
    prompt_ids: Ids
    samples: tuple[Slot, ...]
    pairable: bool


def groups(scored: ScoredTree, player: str) -> list[Group]:
    """Every group of ``player``'s samples in tree order. The defender follows
    ``config.selection`` ("reference": only attacks without a final error can give a pair)."""
    if player == "attacker":
        return [Group(b, 0, s.prompt_ids, s.attacks, True) for b, s in enumerate(scored.seeds)]
    if player == "defender":
        reference = scored.config.selection == "reference"
        return [
            Group(b, a, att.prompt_ids, att.responses, not reference or att.error is None)
            for b, a, att in scored.attacks()
        ]
    raise ValueError(f"player must be one of {PLAYERS}, got {player!r}")


def _trained_groups(scored: ScoredTree, player: str) -> list[Group]:
    """``groups``, none for the attacker of a tree without attacker samples (skip_attacker)."""
    gs = groups(scored, player)
    return [] if player == "attacker" and scored.skip_attacker else gs


def _paired_groups(scored: ScoredTree, player: str) -> list[tuple[Group, int, int]]:
    """(group, chosen, rejected) per pairable group whose patched rewards do not tie."""
    out = []
    for grp in _trained_groups(scored, player):
        p = preference([s.reward for s in grp.samples]) if grp.pairable else None
        if p is not None:
            out.append((grp, *p))
    return out


def pair_indices(scored: ScoredTree, player: str) -> list[tuple[int, int, int, int]]:
    """(b, g, chosen, rejected) of every pair ``player`` gets from ``scored``: per pairable
    group whose patched rewards do not tie, chosen = argmax, rejected = argmin."""
    return [(grp.b, grp.g, c, r) for grp, c, r in _paired_groups(scored, player)]


def _pair(grp: Group, c: int, r: int) -> tuple[TokenPair, bool]:
    chosen, rejected = grp.samples[c].ids, grp.samples[r].ids
    truncated = grp.samples[r].error in _LENGTH_STOPPED and len(rejected) > len(chosen)
    if truncated:
        rejected = rejected[: len(chosen)]
    return TokenPair(as_ids(grp.prompt_ids), as_ids(chosen), as_ids(rejected)), truncated


def pairs_detailed(scored: ScoredTree, player: str) -> list[tuple[TokenPair, bool]]:
    """Pairs of ``player`` with a flag saying whether the rejected sample was truncated (it
    hit the length limit and was longer than the chosen one)."""
    return [_pair(grp, c, r) for grp, c, r in _paired_groups(scored, player)]


def pairs(scored: ScoredTree, player: str) -> list[TokenPair]:
    """DPO/IPO pairs of ``player``. Attacker: prompt = templated seed prompt, completions =
    raw attacker outputs (think included); defender: prompt = templated x, completions = raw
    responses."""
    return [p for p, _ in pairs_detailed(scored, player)]


def grpo_advantages(
    rewards_by_seed: Sequence[Sequence[Optional[float]]], baseline: str
) -> list[list[Optional[float]]]:
    """Advantage = patched reward − mean of the non-None patched rewards, no std scaling.

    ``rewards_by_seed[b]`` lists every sample of seed b (the attacker's A, or the defender's
    A·D flattened). ``across_seeds``: one mean over the batch; ``per_seed``: a mean per seed.
    None rewards give None advantages.
    """
    if baseline not in BASELINES:
        raise ValueError(f"GRPO baseline must be one of {BASELINES}, got {baseline!r}")

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else 0.0

    overall = mean([v for row in rewards_by_seed for v in row])
    out = []
    for row in rewards_by_seed:
        m = overall if baseline == "across_seeds" else mean(row)
        out.append([None if v is None else v - m for v in row])
    return out


def _group_advantages(
    gs: list[Group], num_seeds: int, baseline: str
) -> list[list[Optional[float]]]:
    """Per group, the advantage of each sample; the baseline pools every group of a seed."""
    by_seed = [
        [s.reward for grp in gs if grp.b == b for s in grp.samples] for b in range(num_seeds)
    ]
    flat = [iter(row) for row in grpo_advantages(by_seed, baseline)]
    return [[next(flat[grp.b]) for _ in grp.samples] for grp in gs]


def advantages(scored: ScoredTree, player: str, baseline: str):
    """(advantage, policy) of every sample of ``player``: the advantage (None where the reward
    is None) and whether the sample is error-free, i.e. gets the policy-gradient term
    (GAME_SPEC §2.11). Nested as the tree holds the samples: ``[b][a]`` for the attacker,
    ``[b][a][d]`` for the defender."""
    gs = groups(scored, player)
    adv = _group_advantages(gs, len(scored.seeds), baseline)
    policy = [[s.error is None for s in grp.samples] for grp in gs]
    if player == "attacker":  # one group per seed: the group level is the seed itself
        return adv, policy
    per_seed = [[i for i, grp in enumerate(gs) if grp.b == b] for b in range(len(scored.seeds))]
    return [[adv[i] for i in ix] for ix in per_seed], [[policy[i] for i in ix] for ix in per_seed]


def grpo_samples(
    scored: ScoredTree, player: str, baseline: str, *, include_penalised: bool = False
) -> list[TokenSample]:
    """GRPO samples of ``player`` ("attacker" | "defender") with the sampler's log-probs.

    By default only error-free samples are emitted (GAME_SPEC §2.11: the policy term is on
    error-free samples; penalised ones still shift the baseline). ``include_penalised=True``
    also emits samples patched to −1.
    """
    gs = _trained_groups(scored, player)
    out = []
    for grp, adv in zip(gs, _group_advantages(gs, len(scored.seeds), baseline), strict=True):
        for s, v in zip(grp.samples, adv, strict=True):
            if v is not None and (s.error is None or include_penalised):
                out.append(
                    TokenSample(
                        as_ids(grp.prompt_ids),
                        as_ids(s.ids),
                        float(v),
                        tuple(float(x) for x in s.logprobs),
                    )
                )
    return out
