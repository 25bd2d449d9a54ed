"""The rollout tree (GAME_SPEC §2): error enums and the slot records of one batch of seeds.

A tree is ``B`` seeds, each a ``SeedSlot`` holding its ``A`` attacks (``AttackSlot``), each
holding its ``D`` responses (``ResponseSlot``). Every slot is one frozen record carrying what
was sampled for it (text, token ids, sampler log-probs, finish reason, parsed value) and what
the judges made of it (scores, raw and patched reward), with its error so far: the error
after sampling in a ``RolloutTree``, the final one (adding BAD_DEF_JUDGE / BAD_ATT_JUDGE) in
a ``ScoredTree``. Token ids are the exact ids the samplers produced (``prompt_ids`` are the
chat-templated inputs, ``ids`` the raw outputs), so preference pairs need no re-tokenisation.
Slots that were never sampled (the D responses of an invalid attack, the attacker side in
``skip_attacker`` mode) hold empty values.

Records rather than arrays with masks: slots are ragged (token sequences and texts of any
length), few (B·A·D is tens to hundreds), built on the host from sampler and judge outputs,
and read slot by slot (selection, pairs, audit); ``None`` marks "excluded" directly where an
array layout would need a mask and a sentinel per field. Arrays are made later, per batch of
pairs, by ``training.batching``. ``per_seed`` / ``per_attack`` / ``per_response`` give any
field as a nested ``B`` / ``B×A`` / ``B×A×D`` tuple. The JSON form (audit log) is the generic
``advgame_jax.codec`` one.
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
class ResponseSlot:
    """One defender response y to an attack. The default record is a slot never sampled.

    text / ids / logprobs / finish: the raw output, its ids, sampler log-probs, finish reason.
    y: the response shown to judges (the parsed output; None on error).
    error: MAX_LENGTH, PARSING, PROMPT_NOT_VALID, after judging also BAD_DEF_JUDGE; or None.
    judge_scores: every parsed defender-judge score; raw_reward: their mean (None when not
    judged or all unparsable); reward: the patched reward (GAME_SPEC §2.9; None = excluded).
    """

    text: str = ""
    y: Optional[str] = None
    ids: Ids = ()
    logprobs: tuple[float, ...] = ()
    finish: Optional[str] = None
    error: Optional[YError] = YError.PROMPT_NOT_VALID
    judge_scores: tuple[float, ...] = ()
    raw_reward: Optional[float] = None
    reward: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class AttackSlot:
    """One attacker output for a seed, and the defender's responses to it.

    text / ids / logprobs / finish: the raw attacker output (think part included).
    x: the parsed attack (None when the output did not parse or hit the length limit).
    error: MAX_LENGTH, PARSING, NOT_FAITHFUL, BAD_FAITH_JUDGE, NO_VALID_RESPONSE, after judging
      also BAD_ATT_JUDGE; or None.
    faith_votes: the parsed verdict of each faithfulness judge sample (None = unparsable).
    prompt_ids: the templated defender input (() when x is not valid).
    responses: the D response slots.
    selected_d: the response the attacker was judged on (None for an invalid x).
    judge_scores / raw_reward / reward: as for a response, from the attacker judge.
    """

    text: str
    ids: Ids
    logprobs: tuple[float, ...]
    finish: Optional[str]
    x: Optional[str]
    error: Optional[XError]
    faith_votes: tuple[Optional[bool], ...] = ()
    prompt_ids: Ids = ()
    responses: tuple[ResponseSlot, ...] = ()
    selected_d: Optional[int] = None
    judge_scores: tuple[float, ...] = ()
    raw_reward: Optional[float] = None
    reward: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class SeedSlot:
    """One seed s ("harmful" | "benign"), the templated attacker input (() when the attacker
    was skipped) and its A attack slots."""

    s: str
    category: str
    prompt_ids: Ids
    attacks: tuple[AttackSlot, ...]


@dataclasses.dataclass(frozen=True)
class JudgeStats:
    """Judge bookkeeping of one tree; every dict is keyed by stage ("faith", "defender",
    "attacker") except ``faults`` (backend fault kind -> count during this tree).

    requests: judge requests sent; failures: requests whose result was unusable;
    order_pairs / order_flips: with swap_positions, distinct pairs judged in both orders with
    all four scores parsed, and how many of them changed the preferred side.
    """

    requests: dict[str, int]
    failures: dict[str, int]
    order_pairs: dict[str, int]
    order_flips: dict[str, int]
    faults: dict[str, int]


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


_FIELDS = {
    cls: frozenset(f.name for f in dataclasses.fields(cls))
    for cls in (SeedSlot, AttackSlot, ResponseSlot)
}


def _field(cls: type, name: str) -> str:
    if name not in _FIELDS[cls]:
        raise AttributeError(
            f"{cls.__name__} has no field {name!r} (fields: {sorted(_FIELDS[cls])})"
        )
    return name


@dataclasses.dataclass(frozen=True)
class RolloutTree:
    """Everything sampled for one batch of seeds, before the defender and attacker judges.

    skip_attacker: True when the defender answered the seeds directly (A = 1, x = s).
    Every seed has the same number of attacks and every attack the same number of responses.
    """

    seeds: tuple[SeedSlot, ...]
    skip_attacker: bool

    def __post_init__(self):
        counts = {len(s.attacks) for s in self.seeds}
        sizes = {len(a.responses) for s in self.seeds for a in s.attacks}
        if len(counts) > 1 or len(sizes) > 1:
            raise ValueError(
                f"{type(self).__name__}: every seed needs the same number of attacks "
                f"and every attack the same number of responses, got A in "
                f"{sorted(counts)}, D in {sorted(sizes)}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, A, D)."""
        b = len(self.seeds)
        a = len(self.seeds[0].attacks) if b else 0
        d = len(self.seeds[0].attacks[0].responses) if b and a else 0
        return b, a, d

    def attacks(self) -> Iterable[tuple[int, int, AttackSlot]]:
        """(b, a, slot) of every attack, in order."""
        for b, seed in enumerate(self.seeds):
            for a, att in enumerate(seed.attacks):
                yield b, a, att

    def per_seed(self, name: str) -> tuple:
        """Field ``name`` of every seed slot: a tuple of length B."""
        _field(SeedSlot, name)
        return tuple(getattr(s, name) for s in self.seeds)

    def per_attack(self, name: str) -> tuple:
        """Field ``name`` of every attack slot, nested B × A."""
        _field(AttackSlot, name)
        return tuple(tuple(getattr(a, name) for a in s.attacks) for s in self.seeds)

    def per_response(self, name: str) -> tuple:
        """Field ``name`` of every response slot, nested B × A × D."""
        _field(ResponseSlot, name)
        return tuple(
            tuple(tuple(getattr(r, name) for r in a.responses) for a in s.attacks)
            for s in self.seeds
        )


@dataclasses.dataclass(frozen=True)
class ScoredTree(RolloutTree):
    """A judged tree: its slots carry final errors, judge scores, raw and patched rewards and
    the selected responses; ``config`` is the game config it was played with and
    ``judge_stats`` the judge bookkeeping of all its stages."""

    config: GameConfig
    judge_stats: JudgeStats


def concat_scored_trees(trees: "list[ScoredTree]") -> ScoredTree:
    """One ``ScoredTree`` holding the seeds of ``trees`` in order (same A, D and config), with
    their judge statistics summed: how a split judged in several chunks is summarised whole."""
    if not trees:
        raise ValueError("concat_scored_trees: expected at least one tree")
    if len(trees) == 1:
        return trees[0]
    return dataclasses.replace(
        trees[0],
        seeds=tuple(s for t in trees for s in t.seeds),
        judge_stats=sum_judge_stats(t.judge_stats for t in trees),
    )
