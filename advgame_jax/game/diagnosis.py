"""Say why a training step yields no signal: one line naming the dominant error, the role and
the config field to look at, from the step's metric record.

``no_signal_warning(record)`` reads the per-split keys that ``tree_metrics`` writes under
``<split>/`` (``x/rate/<XError>``, ``y/rate/<YError>``, ``x/slots``, ``y/slots``,
``pairs/<role>``), pools the splits weighted by their slots, and returns ``None`` when the
step has pairs and no error type exceeds ``threshold`` of its slots; otherwise one line such
as ``no training pairs (attacker 0, defender 0): defender responses 86% MAX_LENGTH (look at
sampling.max_new_tokens, game.templates)``. Errors that only follow from another
(NO_VALID_RESPONSE: every response of the attack failed; PROMPT_NOT_VALID: the attack
failed) are named only when nothing upstream explains them.
"""

from __future__ import annotations

from typing import Mapping, Optional

from advgame_jax.game.tree import XError, YError

DOMINANT = 0.8

# (error, what it means for the player, config fields to look at)
_ATTACK_HINTS = {
    XError.MAX_LENGTH: "sampling.max_new_tokens, game.attacker_format",
    XError.PARSING: "game.attacker_format, game.templates",
    XError.NOT_FAITHFUL: "game.templates (attacker task), judge (faithfulness), game.faithfulness",
    XError.BAD_FAITH_JUDGE: "judge (model, max_new_tokens, templates: its answers do not parse)",
    XError.BAD_ATT_JUDGE: "judge (model, max_new_tokens, templates: its scores do not parse)",
    XError.NO_VALID_RESPONSE: "the defender's errors (y/rate/*)",
}
_RESPONSE_HINTS = {
    YError.MAX_LENGTH: "sampling.max_new_tokens, game.templates",
    YError.PARSING: "game.defender_format",
    YError.BAD_DEF_JUDGE: "judge (model, max_new_tokens, templates: its scores do not parse)",
    YError.PROMPT_NOT_VALID: "the attacker's errors (x/rate/*)",
}
_DERIVED = (XError.NO_VALID_RESPONSE, YError.PROMPT_NOT_VALID)


def _pooled_rates(record: Mapping[str, float], splits, name: str, errors) -> dict:
    slots = {s: float(record.get(f"{s}/{name}/slots", 0.0)) for s in splits}
    total = sum(slots.values())
    if total <= 0:
        return {}
    return {
        e: sum(slots[s] * float(record.get(f"{s}/{name}/rate/{e.value}", 0.0)) for s in splits)
        / total
        for e in errors
    }


def no_signal_warning(
    record: Mapping[str, float], *, splits=("harmful", "benign"), threshold: float = DOMINANT
) -> Optional[str]:
    """One warning line for a step without signal, or ``None`` (module docstring)."""
    splits = [s for s in splits if f"{s}/x/slots" in record or f"{s}/y/slots" in record]
    if not splits:
        return None
    pairs = {
        r: sum(float(record.get(f"{s}/pairs/{r}", 0.0)) for s in splits)
        for r in ("attacker", "defender")
    }
    no_pairs = [r for r, n in pairs.items() if n == 0]
    found, top = [], []
    for who, name, errors, hints in (
        ("attacks", "x", XError, _ATTACK_HINTS),
        ("defender responses", "y", YError, _RESPONSE_HINTS),
    ):
        rates = _pooled_rates(record, splits, name, errors)
        ranked = sorted(rates.items(), key=lambda kv: -kv[1])
        for e, rate in ranked:
            text = f"{who} {100 * rate:.0f}% {e.value} (look at {hints[e]})"
            if rate > threshold:
                found.append((e in _DERIVED, text))
            elif rate > 0 and e not in _DERIVED and not top[-1:] == [who]:
                top += [text, who]
    causes = [text for derived, text in found if not derived] or [t for _, t in found]
    if not causes and no_pairs:
        causes = top[::2]  # no dominant error: the largest error of each player
    if not causes and not no_pairs:
        return None
    if len(no_pairs) == 2:
        head = "no training pairs (attacker 0, defender 0)"
    elif no_pairs:
        head = f"no {no_pairs[0]} pairs ({', '.join(f'{r} {int(n)}' for r, n in pairs.items())})"
    else:
        head = "little training signal"
    if not causes:
        return (
            f"{head}: no errors; the judge gave equal scores within each group (look "
            f"at judge, game.num_attacks, game.num_responses, sampling.temperature)"
        )
    return f"{head}: " + "; ".join(causes)
