"""``GameConfig``: every knob of one game rollout (GAME_SPEC §2.2–2.10), validated on
construction, and its translation from the experiment's ``game``, ``judge`` and ``sampling``
sections (``advgame_jax.settings``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from advgame_jax.codec import from_plain, to_plain
from advgame_jax.errors import UserError
from advgame_jax.game.parsing import FAITH_TIES, FORMATS
from advgame_jax.game.templates import TemplateError, get_template_set
from advgame_jax.sampling.base import SamplingParams
from advgame_jax.settings import GameSettings, JudgeSettings, SamplingSettings

SELECTIONS = ("reference", "fallback")
JUDGE_MODES = ("pairwise", "pointwise")
CONDITIONS = ("prompt", "seed")  # what the defender judge sees: the attack x or the seed s
_DEFAULT_SAMPLING = SamplingParams(temperature=0.6, top_p=0.9, max_new_tokens=2048)


class GameConfigError(UserError, ValueError):
    """A ``GameConfig`` field is invalid."""


@dataclasses.dataclass(frozen=True)
class GameConfig:
    """Game settings.

    num_attacks (A) / num_responses (D): samples per seed / per valid attack.
    templates: template set name (``game.templates.available_template_sets()``).
    attacker_format / defender_format: one of ``think_prompt_strict``, ``prompt_strict``, ``any``.
    condition_on: the defender judge sees the attack x (``"prompt"``) or the seed s (``"seed"``).
    optimistic_attacker: the attacker is judged on the defender's best response (else the first
      error-free one).
    attacker_judge_enabled / defender_judge_enabled: when off, error-free slots get reward 0.0.
    judge_mode: ``"pairwise"`` or ``"pointwise"``.
    swap_positions: pairwise only; every pair is judged in both orders and the scores averaged.
    faithfulness / num_faith_samples: the faithfulness check and the judge samples per attack.
    faith_tie: several faithfulness samples split evenly → ``"bad_judge"`` (BAD_FAITH_JUDGE,
      excluded) or ``"not_faithful"`` (the reference's rule, −1).
    selection: ``"reference"``: an attack whose selected response got BAD_DEF_JUDGE is not
      sent to the attacker judge and keeps reward 0.0, and defender pairs come only from
      attacks whose final error is none; ``"fallback"``: such an attack is judged on its first
      sampled response, and every attack can give a defender pair.
    attacker_sampling / defender_sampling: decoding params; ``n`` is overridden by A and D, and
      ``stop_token_ids`` defaults to the tokenizer's when empty.
    """

    num_attacks: int = 2
    num_responses: int = 2
    templates: str = "advgame_v1"
    attacker_format: str = "think_prompt_strict"
    defender_format: str = "any"
    condition_on: str = "prompt"
    optimistic_attacker: bool = True
    attacker_judge_enabled: bool = True
    defender_judge_enabled: bool = True
    judge_mode: str = "pairwise"
    swap_positions: bool = False
    faithfulness: bool = True
    num_faith_samples: int = 1
    faith_tie: str = "bad_judge"
    selection: str = "fallback"
    attacker_sampling: SamplingParams = _DEFAULT_SAMPLING
    defender_sampling: SamplingParams = _DEFAULT_SAMPLING

    def __post_init__(self):
        for name in ("num_attacks", "num_responses", "num_faith_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GameConfigError(f"GameConfig.{name}: expected an integer >= 1, got {value!r}")
        for name, allowed in (
            ("attacker_format", FORMATS),
            ("defender_format", FORMATS),
            ("condition_on", CONDITIONS),
            ("judge_mode", JUDGE_MODES),
            ("faith_tie", FAITH_TIES),
            ("selection", SELECTIONS),
        ):
            if getattr(self, name) not in allowed:
                raise GameConfigError(
                    f"GameConfig.{name}: expected one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in (
            "optimistic_attacker",
            "attacker_judge_enabled",
            "defender_judge_enabled",
            "swap_positions",
            "faithfulness",
        ):
            if not isinstance(getattr(self, name), bool):
                raise GameConfigError(
                    f"GameConfig.{name}: expected True or False, got {getattr(self, name)!r}"
                )
        for name in ("attacker_sampling", "defender_sampling"):
            if not isinstance(getattr(self, name), SamplingParams):
                raise GameConfigError(
                    f"GameConfig.{name}: expected a SamplingParams, "
                    f"got {type(getattr(self, name)).__name__}"
                )
        try:
            get_template_set(self.templates)
        except TemplateError as err:
            raise GameConfigError(f"GameConfig.templates: {err}") from None

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GameConfig":
        return from_plain(cls, d)


def game_config_from(
    game: GameSettings,
    judge: JudgeSettings,
    sampling: SamplingSettings,
    *,
    max_new_tokens: Mapping[str, int],
    seed: int = 0,
) -> GameConfig:
    """The ``GameConfig`` of an experiment's sections: ``game.*``, ``judge.mode /
    swap_positions / condition_on / attacker_judge / defender_judge / num_faith_samples /
    faith_tie`` and ``sampling.*`` with each player's completion budget ``max_new_tokens[role]``
    (``Settings.max_new_tokens``). ``game.templates`` is the set in use (the converter has
    registered ``game.templates_file`` under it)."""
    params = {
        role: SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_new_tokens=int(max_new_tokens[role]),
            seed=seed,
        )
        for role in ("attacker", "defender")
    }
    return GameConfig(
        num_attacks=game.num_attacks,
        num_responses=game.num_responses,
        templates=game.templates,
        attacker_format=game.attacker_format,
        defender_format=game.defender_format,
        condition_on=judge.condition_on,
        optimistic_attacker=game.optimistic_attacker,
        attacker_judge_enabled=judge.attacker_judge,
        defender_judge_enabled=judge.defender_judge,
        judge_mode=judge.mode,
        swap_positions=judge.swap_positions,
        faithfulness=game.faithfulness,
        num_faith_samples=judge.num_faith_samples,
        faith_tie=judge.faith_tie,
        selection=game.selection,
        attacker_sampling=params["attacker"],
        defender_sampling=params["defender"],
    )
