"""Parsing of player outputs (attack formats, GAME_SPEC §2.3) and of judge outputs (scores
§2.6, faithfulness verdicts §2.4).

Attack formats:

- ``think_prompt_strict``: ``<think>…</think>`` then ``<prompt>…</prompt>``; surrounding
  whitespace is allowed, nothing else: no text before ``<think>``, only whitespace between
  ``</think>`` and ``<prompt>`` and after ``</prompt>``, each of the four tags exactly once.
- ``prompt_strict``: ``<prompt>…</prompt>`` alone, same rules, and no think tag anywhere.
- ``any``: the whole output.

In every format ``x`` is the stripped body. An empty body is accepted (the spec's patterns
match it, and ``any`` must never fail: the defender's only error under it is MAX_LENGTH); an
empty attack is then judged unfaithful by the faithfulness judge rather than PARSING.

Judge scores: the LAST ``<score_A>…</score_A>`` (or ``<score_B>``, ``<score>``) element is
read; its stripped content must be a number with at most one decimal (optionally signed),
optionally followed by ``/10``; the value is clipped to [0, 10] (the judge counts clipped
values as ``score_out_of_range`` faults, see ``score_out_of_range``). Anything else (``7.25``,
``abc``, ``-``, ``8/5``, no element at all) is ``None``. An earlier well-formed element does
not rescue a malformed last one: the last element is the judge's final answer.

Faithfulness: the last ``<answer>…</answer>`` element must hold ``True`` or ``False``
(case-insensitive), else ``None``. Several judge samples are combined by ``faith_majority``.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

FORMATS = ("think_prompt_strict", "prompt_strict", "any")

_THINK_PROMPT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<prompt>(.*?)</prompt>\s*", re.DOTALL)
_PROMPT_RE = re.compile(r"\s*<prompt>(.*?)</prompt>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<prompt>", "</prompt>")
_NUMBER_RE = re.compile(r"(-?\d+(?:\.\d)?)(?:\s*/\s*10)?")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_SCORE_RES = {tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL) for tag in ("score_A", "score_B", "score")}


def parse_attack(text: str, fmt: str) -> Optional[str]:
    """The attack ``x`` in ``text`` under format ``fmt``, or None when the format is violated."""
    if fmt == "any":
        body = text
    elif fmt == "think_prompt_strict":
        if any(text.count(tag) != 1 for tag in _TAGS):
            return None
        m = _THINK_PROMPT_RE.fullmatch(text)
        body = m.group(2) if m else None
    elif fmt == "prompt_strict":
        if text.count("<prompt>") != 1 or text.count("</prompt>") != 1:
            return None
        if "<think>" in text or "</think>" in text:
            return None
        m = _PROMPT_RE.fullmatch(text)
        body = m.group(1) if m else None
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return None if body is None else body.strip()


def parse_number(content: str) -> Optional[float]:
    """A 0–10 score from an element's content (see module docstring), or None."""
    m = _NUMBER_RE.fullmatch(content.strip())
    if m is None:
        return None
    return min(10.0, max(0.0, float(m.group(1))))


def parse_score(text: Optional[str], tag: str = "score") -> Optional[float]:
    """Score in the last ``<tag>…</tag>`` element of a judge output (``tag`` in score, score_A, score_B)."""
    if text is None:
        return None
    matches = _SCORE_RES[tag].findall(text)
    return parse_number(matches[-1]) if matches else None


def score_out_of_range(text: Optional[str], tag: str = "score") -> bool:
    """True when the score ``parse_score`` reads was outside [0, 10] before clipping."""
    if text is None:
        return False
    matches = _SCORE_RES[tag].findall(text)
    m = _NUMBER_RE.fullmatch(matches[-1].strip()) if matches else None
    return m is not None and not 0.0 <= float(m.group(1)) <= 10.0


def parse_pair_scores(text: Optional[str]) -> tuple[Optional[float], Optional[float]]:
    """``(score_A, score_B)`` of a pairwise judge output; each side parses independently."""
    return parse_score(text, "score_A"), parse_score(text, "score_B")


def parse_faith_verdict(text: Optional[str]) -> Optional[bool]:
    """True/False from the last ``<answer>`` element, or None."""
    if text is None:
        return None
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    word = matches[-1].strip().lower()
    return {"true": True, "false": False}.get(word)


def faith_majority(verdicts: Iterable[Optional[bool]]) -> Optional[bool]:
    """Majority over the parsable verdicts of several judge samples.

    Unparsable samples (None) abstain. No parsable sample, or as many True as False, gives
    None (→ ``BAD_FAITH_JUDGE``): a tied judge has not said the attack is faithful, and
    counting the tie as unfaithful would charge the attacker −1 for the judge's indecision.
    """
    votes = [v for v in verdicts if v is not None]
    yes = sum(1 for v in votes if v)
    no = len(votes) - yes
    if yes == no:
        return None
    return yes > no
