"""Judge calls of one rollout stage, each returning its results and its ``JudgeStats`` part.

A stage ("faith", "defender", "attacker") sends one batched call to the judge. ``call_judge``
guards it: a judge exception or a wrong result count turns every result into the stage's
failed value and is counted as a ``judge_exception`` fault; backend faults are the judge's
``fault_counts()`` difference across the call. ``judge_groups`` scores groups of responses
(pointwise, or all pairs in one or both orders) for the defender and attacker stages. The
caller sums the parts of its stages with ``sum_stats``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any, Hashable, Iterable, Optional, Sequence

from advgame_jax.game.config import GameConfig
from advgame_jax.game.judge import Judge, PairRequest, PointRequest
from advgame_jax.game.tree import JudgeStats, sum_judge_stats

log = logging.getLogger(__name__)
STAGES = ("faith", "defender", "attacker")


def stage_stats(
    stage: str,
    *,
    requests: int = 0,
    failures: int = 0,
    order_pairs: int = 0,
    order_flips: int = 0,
    faults: Optional[dict] = None,
) -> JudgeStats:
    """The ``JudgeStats`` part of one stage."""
    return JudgeStats(
        {stage: requests},
        {stage: failures},
        {stage: order_pairs},
        {stage: order_flips},
        dict(faults or {}),
    )


def sum_stats(parts: Iterable[JudgeStats]) -> JudgeStats:
    """Stage parts summed into a tree's stats: every stage present (zeros included), faults
    summed and sorted by kind."""
    total = sum_judge_stats(parts, STAGES)
    return dataclasses.replace(total, faults=dict(sorted(total.faults.items())))


def _fault_counts(judge: Judge) -> dict:
    fn = getattr(judge, "fault_counts", None)
    try:
        return dict(fn()) if fn else {}
    except Exception:
        return {}


def call_judge(
    judge: Judge, method: str, stage: str, requests: list, failed: Any
) -> tuple[list, JudgeStats]:
    """``judge.<method>(requests)`` guarded (see module docstring); no call when empty.

    The part returned counts requests and faults; the caller adds the failures it parses.
    """
    if not requests:
        return [], stage_stats(stage)
    start = _fault_counts(judge)
    exceptions = 0
    try:
        out = list(getattr(judge, method)(requests))
        if len(out) != len(requests):
            raise ValueError(
                f"judge.{method} returned {len(out)} results for {len(requests)} requests"
            )
    except Exception as err:  # a judge fault must not end the step (GAME_SPEC error values)
        log.warning(
            "judge.%s failed for %d requests: %s", method, len(requests), type(err).__name__
        )
        exceptions = 1
        out = [failed] * len(requests)
    end = _fault_counts(judge)
    faults = {k: end[k] - start.get(k, 0) for k in end if end[k] - start.get(k, 0) > 0}
    if exceptions:
        faults["judge_exception"] = exceptions
    return out, stage_stats(stage, requests=len(requests), faults=faults)


def finite(v) -> Optional[float]:
    """``float(v)`` when it is a finite number, else None."""
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclasses.dataclass(frozen=True)
class JudgeGroup:
    """Responses judged together under one rubric and query; ``slots[i]`` names
    ``responses[i]`` in the tree (e.g. ``(b, a, d)``)."""

    rubric: str
    query: str
    slots: tuple[Hashable, ...]
    responses: tuple[str, ...]


def _pointwise(judge: Judge, stage: str, groups: Sequence[JudgeGroup]):
    slots, reqs = [], []
    for g in groups:
        for slot, r in zip(g.slots, g.responses, strict=True):
            slots.append(slot)
            reqs.append(PointRequest(g.rubric, g.query, r))
    results, part = call_judge(judge, "pointwise", stage, reqs, None)
    scores = {slot: [] for g in groups for slot in g.slots}
    failures = 0
    for slot, v in zip(slots, results, strict=True):
        v = finite(v)
        if v is None:
            failures += 1
        else:
            scores[slot].append(v)
    return scores, dataclasses.replace(part, failures={stage: failures})


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def _pairwise(judge: Judge, stage: str, groups: Sequence[JudgeGroup], swap: bool):
    where, reqs = [], []
    orders = (False, True) if swap else (False,)
    for gi, g in enumerate(groups):
        n = len(g.responses)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)] if n > 1 else [(0, 0)] * n
        for i, j in pairs:
            for swapped in orders:
                first, second = (j, i) if swapped else (i, j)
                where.append((gi, i, j, swapped))
                reqs.append(PairRequest(g.rubric, g.query, g.responses[first], g.responses[second]))
    results, part = call_judge(judge, "pairwise", stage, reqs, (None, None))
    scores = {slot: [] for g in groups for slot in g.slots}
    by_pair = collections.defaultdict(dict)
    failures = 0
    for (gi, i, j, swapped), res in zip(where, results, strict=True):
        try:
            sa, sb = res
        except (TypeError, ValueError):
            sa = sb = None
        sa, sb = finite(sa), finite(sb)
        first, second = (j, i) if swapped else (i, j)
        if sa is None or sb is None:
            failures += 1
        if sa is not None:
            scores[groups[gi].slots[first]].append(sa)
        if sb is not None:
            scores[groups[gi].slots[second]].append(sb)
        by_pair[(gi, i, j)][swapped] = (sa, sb)
    order_pairs = order_flips = 0
    if swap:
        for (_gi, i, j), both in by_pair.items():
            (sa1, sb1), (sa2, sb2) = both[False], both[True]
            if i == j or None in (sa1, sb1, sa2, sb2):
                continue
            order_pairs += 1
            # Preference for response i: position A in the first order, position B in the second.
            order_flips += _sign(sa1 - sb1) != _sign(sb2 - sa2)
    return scores, dataclasses.replace(
        part,
        failures={stage: failures},
        order_pairs={stage: order_pairs},
        order_flips={stage: order_flips},
    )


def judge_groups(
    judge: Judge, stage: str, groups: Sequence[JudgeGroup], config: GameConfig
) -> tuple[dict, JudgeStats]:
    """Judge ``groups`` in one call: ({slot: (score, ...)}, the stage's stats part).

    Each slot gets every parsed score it received. Pointwise: one request per response.
    Pairwise: all pairs i < j of a group (a lone response is compared with itself), in both
    orders with ``config.swap_positions``.
    """
    if config.judge_mode == "pointwise":
        scores, part = _pointwise(judge, stage, groups)
    else:
        scores, part = _pairwise(judge, stage, groups, config.swap_positions)
    return {slot: tuple(v) for slot, v in scores.items()}, part
