"""From judged slots to training signal: reward patching (GAME_SPEC §2.9), selection of the
response the attacker is judged on (§2.7), preference pairs (§2.10) and GRPO advantages
(§2.11). Pure functions of plain values; the ``ScoredTree`` wrappers at the end emit
``advgame_jax.types`` records for training.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from advgame_jax.game.tree import ScoredTree, XError, YError
from advgame_jax.types import TokenPair, TokenSample, as_ids

PENALTY = -1.0
BASELINES = ("across_seeds", "per_seed")
_X_PENALISED = (XError.MAX_LENGTH, XError.PARSING, XError.NOT_FAITHFUL)
_Y_PENALISED = (YError.MAX_LENGTH, YError.PARSING)


def patch_x_reward(error: Optional[XError], raw: Optional[float], judge_enabled: bool) -> Optional[float]:
    """Attacker reward of one slot: judge score (0.0 with the judge off) when error-free, −1
    for MAX_LENGTH / PARSING / NOT_FAITHFUL, None (excluded) for the judge-side errors."""
    if error is None:
        if not judge_enabled:
            return 0.0
        if raw is None:
            raise ValueError("an error-free attack judged by an enabled judge must have a raw reward")
        return float(raw)
    if error in _X_PENALISED:
        return PENALTY
    return None


def patch_y_reward(error: Optional[YError], raw: Optional[float], judge_enabled: bool) -> Optional[float]:
    """Defender reward of one slot: judge score (0.0 with the judge off) when error-free, −1
    for MAX_LENGTH / PARSING, None for PROMPT_NOT_VALID / BAD_DEF_JUDGE."""
    if error is None:
        if not judge_enabled:
            return 0.0
        if raw is None:
            raise ValueError("an error-free response judged by an enabled judge must have a raw reward")
        return float(raw)
    if error in _Y_PENALISED:
        return PENALTY
    return None


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


def select_response(sampled_ok: Sequence[bool], judged_reward: Sequence[Optional[float]],
                    optimistic: bool) -> Optional[int]:
    """The response (index over D) the attacker is judged on, for one valid attack.

    ``sampled_ok[d]``: response d has no sampling error; ``judged_reward[d]``: its patched
    defender reward when it is error-free after judging, else None. Optimistic: argmax of the
    judged rewards (first wins ties); otherwise the first judged response. When no response
    survived judging (all BAD_DEF_JUDGE), the first response without a sampling error is
    used, so the attacker is still judged on what the defender said. None if nothing was
    sampled successfully.
    """
    judged = [r if ok else None for ok, r in zip(sampled_ok, judged_reward)]
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
    if c is None or values[c] == values[r]:
        return None
    return c, r


@dataclasses.dataclass(frozen=True)
class _Role:
    """One player's samples in a scored tree, nested ``[b][g][i]``: the attacker has one
    group per seed (its A attacks), the defender one group per attack (its D responses).
    Pairs are formed within a group (when ``pairable_BG``); the GRPO baseline pools all the
    groups of a seed. ``max_length`` is the player's length-stop error."""

    prompt_BG: tuple
    ids_BGI: tuple
    logprobs_BGI: tuple
    reward_BGI: tuple
    error_BGI: tuple
    pairable_BG: Optional[tuple]
    max_length: object


def _role(scored: ScoredTree, player: str) -> _Role:
    t = scored.tree
    if player == "attacker":
        def one(v):
            return tuple((row,) for row in v)
        return _Role(one(t.att_prompt_ids_B), one(t.att_ids_BA), one(t.att_logprobs_BA),
                     one(scored.x_reward_BA), one(scored.x_error_BA), None, XError.MAX_LENGTH)
    if player == "defender":
        return _Role(t.def_prompt_ids_BA, t.y_ids_BAD, t.y_logprobs_BAD, scored.y_reward_BAD,
                     scored.y_error_BAD, _pairable(scored.x_error_BA if scored.config.selection == "reference"
                                                   else None), YError.MAX_LENGTH)
    raise ValueError(f"player must be 'attacker' or 'defender', got {player!r}")


def _pairable(x_error_BA) -> Optional[tuple]:
    if x_error_BA is None:
        return None
    return tuple(tuple(e is None for e in row) for row in x_error_BA)


def _pair_indices(reward_BGI, pairable_BG=None) -> list[tuple[int, int, int, int]]:
    """(b, g, i_chosen, i_rejected) per pairable group whose rewards do not tie."""
    out = []
    for b, groups in enumerate(reward_BGI):
        for g, row in enumerate(groups):
            if pairable_BG is not None and not pairable_BG[b][g]:
                continue
            p = preference(row)
            if p is not None:
                out.append((b, g, *p))
    return out


def attacker_pair_indices(x_reward_BA) -> list[tuple[int, int, int]]:
    """(b, a_chosen, a_rejected) per seed that has a pair."""
    return [(b, c, r) for b, _, c, r in _pair_indices([(row,) for row in x_reward_BA])]


def defender_pair_indices(y_reward_BAD, x_error_BA=None) -> list[tuple[int, int, int, int]]:
    """(b, a, d_chosen, d_rejected) per attack that has a pair. With ``x_error_BA`` (the
    reference's rule), only attacks whose final error is none can give a pair: an attack
    whose attacker judgment failed (BAD_ATT_JUDGE) gives none."""
    return _pair_indices(y_reward_BAD, _pairable(x_error_BA))


def _pair(prompt, chosen, rejected, rejected_hit_length: bool) -> tuple[TokenPair, bool]:
    truncated = rejected_hit_length and len(rejected) > len(chosen)
    if truncated:
        rejected = rejected[: len(chosen)]
    return TokenPair(as_ids(prompt), as_ids(chosen), as_ids(rejected)), truncated


def pair_indices(scored: ScoredTree, player: str) -> list[tuple[int, int, int, int]]:
    """(b, g, chosen, rejected) of every pair ``player`` gets from ``scored``; the group g is
    0 for the attacker (one group per seed) and the attack a for the defender. The defender
    follows ``config.selection`` ("reference": pairs only for attacks without a final error);
    a tree without attacker samples (``skip_attacker``) gives the attacker none."""
    role = _role(scored, player)
    if player == "attacker" and scored.tree.skip_attacker:
        return []
    return _pair_indices(role.reward_BGI, role.pairable_BG)


def pairs_detailed(scored: ScoredTree, player: str) -> list[tuple[TokenPair, bool]]:
    """Pairs of ``player`` with a flag saying whether the rejected sample was truncated."""
    role = _role(scored, player)
    return [_pair(role.prompt_BG[b][g], role.ids_BGI[b][g][c], role.ids_BGI[b][g][r],
                  role.error_BGI[b][g][r] == role.max_length)
            for b, g, c, r in pair_indices(scored, player)]


def attacker_pairs_detailed(scored: ScoredTree) -> list[tuple[TokenPair, bool]]:
    """Attacker pairs with a flag saying whether the rejected sample was truncated."""
    return pairs_detailed(scored, "attacker")


def defender_pairs_detailed(scored: ScoredTree) -> list[tuple[TokenPair, bool]]:
    return pairs_detailed(scored, "defender")


def attacker_pairs(scored: ScoredTree) -> list[TokenPair]:
    """DPO/IPO pairs of the attacker: prompt = templated seed prompt, completions = raw
    attacker outputs (think included), one pair per seed whose patched rewards differ."""
    return [p for p, _ in attacker_pairs_detailed(scored)]


def defender_pairs(scored: ScoredTree) -> list[TokenPair]:
    """DPO/IPO pairs of the defender: prompt = templated x, completions = raw responses."""
    return [p for p, _ in defender_pairs_detailed(scored)]


def grpo_advantages(rewards_by_seed: Sequence[Sequence[Optional[float]]], baseline: str
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


def _advantages(role: _Role, baseline: str):
    """(advantage_BGI, policy_BGI): the baseline pools every sample of a seed."""
    flat = [[v for row in groups for v in row] for groups in role.reward_BGI]
    adv_flat = grpo_advantages(flat, baseline)
    adv = []
    for b, groups in enumerate(role.reward_BGI):
        starts = [0]
        for row in groups:
            starts.append(starts[-1] + len(row))
        adv.append([adv_flat[b][starts[g]:starts[g + 1]] for g in range(len(groups))])
    policy = [[[e is None for e in row] for row in groups] for groups in role.error_BGI]
    return adv, policy


def attacker_advantages(scored: ScoredTree, baseline: str):
    """(advantage_BA, policy_BA): per-sample advantages (None where the reward is None) and
    whether the sample is error-free, i.e. gets the policy-gradient term (GAME_SPEC §2.11)."""
    adv, policy = _advantages(_role(scored, "attacker"), baseline)
    return [groups[0] for groups in adv], [groups[0] for groups in policy]


def defender_advantages(scored: ScoredTree, baseline: str):
    """(advantage_BAD, policy_BAD); the baseline groups all A·D responses of a seed."""
    return _advantages(_role(scored, "defender"), baseline)


def grpo_samples(scored: ScoredTree, player: str, baseline: str, *,
                 include_penalised: bool = False) -> list[TokenSample]:
    """GRPO samples of ``player`` ("attacker" | "defender") with the sampler's log-probs.

    By default only error-free samples are emitted (GAME_SPEC §2.11: the policy term is on
    error-free samples; penalised ones still shift the baseline). ``include_penalised=True``
    also emits samples patched to −1.
    """
    role = _role(scored, player)
    if player == "attacker" and scored.tree.skip_attacker:
        return []
    adv, policy = _advantages(role, baseline)
    out = []
    for b, groups in enumerate(adv):
        for g, row in enumerate(groups):
            for i, v in enumerate(row):
                if v is not None and (policy[b][g][i] or include_penalised):
                    out.append(TokenSample(as_ids(role.prompt_BG[b][g]), as_ids(role.ids_BGI[b][g][i]),
                                           float(v), tuple(float(x) for x in role.logprobs_BGI[b][g][i])))
    return out
