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

from advgame_jax.game.rewards import pairs_detailed
from advgame_jax.game.tree import ScoredTree, XError, YError


def _flat2(v):
    return [x for row in v for x in row]


def _flat3(v):
    return [x for rows in v for row in rows for x in row]


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
    t = scored.tree
    out: dict[str, float] = {}
    for name, errors, enum_cls in (("x", _flat2(scored.x_error_BA), XError),
                                   ("y", _flat3(scored.y_error_BAD), YError)):
        n = len(errors)
        out[f"{name}/slots"] = float(n)
        out[f"{name}/rate/valid"] = sum(e is None for e in errors) / n if n else 0.0
        for e in enum_cls:
            out[f"{name}/rate/{e.value}"] = sum(err == e for err in errors) / n if n else 0.0
    _mean_std("x/reward", _flat2(scored.x_reward_BA), out)
    _mean_std("x/raw_reward", _flat2(scored.x_raw_reward_BA), out)
    _mean_std("y/reward", _flat3(scored.y_reward_BAD), out)
    _mean_std("y/raw_reward", _flat3(scored.y_raw_reward_BAD), out)

    if not t.skip_attacker:
        _mean("x/attacker_tokens/mean", [len(ids) for ids in _flat2(t.att_ids_BA)], out)
    _mean("x/chars/mean", [len(x) for x, e in zip(_flat2(t.x_BA), _flat2(scored.x_error_BA))
                           if e is None and x is not None], out)
    _mean("y/tokens/mean", [len(ids) for ids, f in zip(_flat3(t.y_ids_BAD), _flat3(t.y_finish_BAD))
                            if f is not None], out)

    pairs = {role: pairs_detailed(scored, role) for role in ("attacker", "defender")}
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
