"""Parsing of player outputs (attack formats, GAME_SPEC §2.3) and of judge outputs (scores
§2.6, faithfulness verdicts §2.4), with the reference implementation's rules (GAME_SPEC §2b).

Attack formats (tag names match case-insensitively, ``<THINK>`` is ``<think>``):

- ``think_prompt_strict``: ``<think>…</think>`` then ``<prompt>…</prompt>``; surrounding
  whitespace is allowed, nothing else: no text before ``<think>``, only whitespace between
  ``</think>`` and ``<prompt>`` and after ``</prompt>``. Neither body may contain ``think>``,
  ``prompt>``, or ``<think`` / ``</think`` / ``<prompt`` / ``</prompt`` as a whole word (so
  no nested, repeated or stray tag of either kind).
- ``prompt_strict``: ``<prompt>…</prompt>`` alone (nothing before it), the same rules for the
  prompt tag only: a think tag inside the prompt body is allowed, as in the reference.
- ``any``: the whole output.

In every format ``x`` is the stripped body. An empty body is accepted (the spec's patterns
match it, and ``any`` must never fail: the defender's only error under it is MAX_LENGTH); an
empty attack is then judged unfaithful by the faithfulness judge rather than PARSING. A
generation that did not end with finish reason ``"stop"`` is MAX_LENGTH before any parsing
(:func:`stopped_early`).

Judge scores: of all ``<score_A>…</score_A>`` (or ``<score_B>``, ``<score>``) elements, the
LAST WELL-FORMED one is read: its stripped content is a non-negative number with at most one
decimal, optionally followed by ``/10``; the value is clipped to 10 (the judge counts
clipped values as ``score_out_of_range`` faults). Malformed elements
(``7.25``, ``abc``, ``-3``, ``8/5``) are skipped; none well-formed gives ``None``. A pairwise
judgment needs both scores: if either side has no well-formed element, both are ``None``.

Faithfulness: the verdict is the FIRST WELL-FORMED ``<answer>…</answer>`` element, one holding
exactly ``True`` or ``False`` (surrounding whitespace allowed, case-sensitive), as in the
reference; elements holding anything else are skipped (judges often echo the instruction's
``<answer> your answer </answer>`` before answering). None well-formed gives ``None``.
Several judge samples are combined by ``faith_majority``.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

FORMATS = ("think_prompt_strict", "prompt_strict", "any")
FAITH_TIES = ("not_faithful", "bad_judge")


def _body(*tags: str) -> str:
    """A tag body: text holding no ``<tag``/``</tag`` opening (as a whole word) and no
    ``tag>`` for any of ``tags``."""
    banned = "|".join([rf"</?{t}\b" for t in tags] + [f"{t}>" for t in tags])
    return rf"((?:(?!{banned}).)*?)"


_THINK_PROMPT_RE = re.compile(
    rf"\s*<think>{_body('think', 'prompt')}</think>\s*<prompt>{_body('think', 'prompt')}</prompt>\s*",
    re.DOTALL | re.IGNORECASE,
)
_PROMPT_RE = re.compile(rf"\s*<prompt>{_body('prompt')}</prompt>\s*", re.DOTALL | re.IGNORECASE)
_NUMBER_RE = re.compile(r"(\d+(?:\.\d)?)(?:\s*/\s*10)?")
_VERDICT_RE = re.compile(r"<answer>\s*(True|False)\s*</answer>")
_SCORE_RES = {
    tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL) for tag in ("score_A", "score_B", "score")
}


def stopped_early(finish_reason) -> bool:
    """True when a generation did not end on a stop token (finish reason other than "stop":
    "length", an abort, or none reported): the slot is MAX_LENGTH, its text is not parsed."""
    return finish_reason != "stop"


def parse_attack(text: str, fmt: str) -> Optional[str]:
    """The attack ``x`` in ``text`` under format ``fmt``, or None when the format is violated."""
    if fmt == "any":
        body = text
    elif fmt == "think_prompt_strict":
        m = _THINK_PROMPT_RE.fullmatch(text)
        body = m.group(2) if m else None
    elif fmt == "prompt_strict":
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
    return min(10.0, float(m.group(1)))


def parse_score(text: Optional[str], tag: str = "score") -> Optional[float]:
    """Score in the last well-formed ``<tag>…</tag>`` element of a judge output (``tag`` in
    score, score_A, score_B), or None."""
    if text is None:
        return None
    for content in reversed(_SCORE_RES[tag].findall(text)):
        value = parse_number(content)
        if value is not None:
            return value
    return None


def score_out_of_range(text: Optional[str], tag: str = "score") -> bool:
    """True when the element ``parse_score`` reads held a number above 10 (then clipped)."""
    if text is None:
        return False
    for content in reversed(_SCORE_RES[tag].findall(text)):
        m = _NUMBER_RE.fullmatch(content.strip())
        if m is not None:
            return float(m.group(1)) > 10.0
    return False


def parse_pair_scores(text: Optional[str]) -> tuple[Optional[float], Optional[float]]:
    """``(score_A, score_B)`` of a pairwise judge output; ``(None, None)`` unless both parse."""
    a, b = parse_score(text, "score_A"), parse_score(text, "score_B")
    if a is None or b is None:
        return None, None
    return a, b


def parse_faith_verdict(text: Optional[str]) -> Optional[bool]:
    """True/False from the first well-formed ``<answer>`` element, or None."""
    if text is None:
        return None
    m = _VERDICT_RE.search(text)
    return None if m is None else m.group(1) == "True"


def faith_majority(verdicts: Iterable[Optional[bool]], tie: str = "bad_judge") -> Optional[bool]:
    """Majority over the parsable verdicts of several judge samples.

    Unparsable samples (None) abstain; no parsable sample gives None (→ ``BAD_FAITH_JUDGE``).
    As many True as False: ``tie="not_faithful"`` (the reference's rule: an attack must win a
    strict majority) gives False; ``tie="bad_judge"`` gives None, so the judge's indecision is
    excluded from pairs instead of charging the attacker −1.
    """
    if tie not in FAITH_TIES:
        raise ValueError(f"faithfulness tie rule must be one of {FAITH_TIES}, got {tie!r}")
    votes = [v for v in verdicts if v is not None]
    if not votes:
        return None
    yes = sum(1 for v in votes if v)
    no = len(votes) - yes
    if yes == no:
        return False if tie == "not_faithful" else None
    return yes > no
