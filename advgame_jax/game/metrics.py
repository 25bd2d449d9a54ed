"""``tree_metrics``: scalar summaries of one ``ScoredTree`` for the metrics writers.

Keys (all floats):

- ``x/rate/valid`` and ``x/rate/<XError>`` over the B·A attack slots; ``y/rate/valid`` and
  ``y/rate/<YError>`` over the B·A·D response slots (each family sums to 1);
  ``x/slots``, ``y/slots``.
- ``{x,y}/reward/{mean,std}`` over the non-None patched rewards, ``{x,y}/raw_reward/{mean,std}``
  over the judge rewards (population std); omitted when there is no value.
- ``x/attacker_tokens/mean`` (attacker outputs), ``y/tokens/mean`` (sampled responses),
  ``x/chars/mean`` (valid attacks); omitted when empty.
- ``pairs/attacker``, ``pairs/defender``, ``pairs/attacker_truncated``, ``pairs/defender_truncated``.
- ``judge/<stage>/requests``, ``judge/<stage>/failures`` for stage in faith, defender,
  attacker; ``judge/<stage>/order_disagreement`` (with swap_positions, when any pair was
  judged cleanly in both orders); ``judge/faults/<kind>`` for every fault seen in this tree.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

from advgame_jax.game.rewards import PLAYERS, pairs_detailed
from advgame_jax.game.tree import ScoredTree, XError, YError


def _mean_std(prefix: str, values: Iterable[Optional[float]], out: dict) -> None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return
    m = sum(vals) / len(vals)
    out[f"{prefix}/mean"] = m
    out[f"{prefix}/std"] = math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def _mean(key: str, values: list, out: dict) -> None:
    if values:
        out[key] = float(sum(values)) / len(values)


def tree_metrics(scored: ScoredTree) -> dict[str, float]:
    """Metrics of one scored tree (keys in the module docstring)."""
    attacks = [att for _, _, att in scored.attacks()]
    responses = [r for att in attacks for r in att.responses]
    out: dict[str, float] = {}
    for name, slots, enum_cls in (("x", attacks, XError), ("y", responses, YError)):
        n = len(slots)
        out[f"{name}/slots"] = float(n)
        out[f"{name}/rate/valid"] = sum(s.error is None for s in slots) / n if n else 0.0
        for e in enum_cls:
            out[f"{name}/rate/{e.value}"] = sum(s.error == e for s in slots) / n if n else 0.0
    for name, slots in (("x", attacks), ("y", responses)):
        _mean_std(f"{name}/reward", (s.reward for s in slots), out)
        _mean_std(f"{name}/raw_reward", (s.raw_reward for s in slots), out)

    if not scored.skip_attacker:
        _mean("x/attacker_tokens/mean", [len(att.ids) for att in attacks], out)
    _mean(
        "x/chars/mean",
        [len(att.x) for att in attacks if att.error is None and att.x is not None],
        out,
    )
    _mean("y/tokens/mean", [len(r.ids) for r in responses if r.finish is not None], out)

    pairs = {role: pairs_detailed(scored, role) for role in PLAYERS}
    for role, p in pairs.items():
        out[f"pairs/{role}"] = float(len(p))
    for role, p in pairs.items():
        out[f"pairs/{role}_truncated"] = float(sum(tr for _, tr in p))

    js = scored.judge_stats
    for stage in ("faith", "defender", "attacker"):
        out[f"judge/{stage}/requests"] = float(js.requests.get(stage, 0))
        out[f"judge/{stage}/failures"] = float(js.failures.get(stage, 0))
        pairs = js.order_pairs.get(stage, 0)
        if pairs:
            out[f"judge/{stage}/order_disagreement"] = js.order_flips.get(stage, 0) / pairs
    for kind, count in js.faults.items():
        out[f"judge/faults/{kind}"] = float(count)
    return out
