"""``GameConfig``: every knob of one game rollout (GAME_SPEC §2.2–2.10), validated on
construction, and its translation from an experiment ``ConfigDict`` (``configs/base.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from advgame_jax.codec import from_plain, to_plain
from advgame_jax.errors import UserError
from advgame_jax.game.parsing import FAITH_TIES, FORMATS
from advgame_jax.game.templates import TemplateError, get_template_set, load_template_file
from advgame_jax.sampling.base import SamplingParams

SELECTIONS = ("reference", "fallback")
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
        for name, allowed in (("attacker_format", FORMATS), ("defender_format", FORMATS),
                              ("condition_on", ("prompt", "seed")),
                              ("judge_mode", ("pairwise", "pointwise")),
                              ("faith_tie", FAITH_TIES), ("selection", SELECTIONS)):
            if getattr(self, name) not in allowed:
                raise GameConfigError(f"GameConfig.{name}: expected one of {allowed}, "
                                      f"got {getattr(self, name)!r}")
        for name in ("optimistic_attacker", "attacker_judge_enabled", "defender_judge_enabled",
                     "swap_positions", "faithfulness"):
            if not isinstance(getattr(self, name), bool):
                raise GameConfigError(f"GameConfig.{name}: expected True or False, "
                                      f"got {getattr(self, name)!r}")
        for name in ("attacker_sampling", "defender_sampling"):
            if not isinstance(getattr(self, name), SamplingParams):
                raise GameConfigError(f"GameConfig.{name}: expected a SamplingParams, "
                                      f"got {type(getattr(self, name)).__name__}")
        try:
            get_template_set(self.templates)
        except TemplateError as err:
            raise GameConfigError(f"GameConfig.templates: {err}") from None

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GameConfig":
        return from_plain(cls, d)


def game_config_from_experiment(config: Any) -> GameConfig:
    """A ``GameConfig`` from an experiment ConfigDict (fields of ``configs/base.py``:
    ``game.templates_file``, when set, is loaded and registered, and its set is used;
    ``game.*``, ``judge.mode/swap_positions/condition_on/attacker_judge/defender_judge/
    num_faith_samples`` and ``sampling.*``)."""
    s = config.sampling
    params = {role: SamplingParams(temperature=float(s.temperature), top_p=float(s.top_p),
                                   top_k=int(s.top_k),
                                   max_new_tokens=player_max_new_tokens(config, role),
                                   seed=int(config.get("seed", 0)))
              for role in ("attacker", "defender")}
    g, j = config.game, config.judge
    templates = g.templates
    if g.get("templates_file", ""):
        try:
            templates = load_template_file(g.templates_file).name
        except TemplateError as err:
            raise GameConfigError(f"config.game.templates_file: {err}") from None
    return GameConfig(
        num_attacks=g.num_attacks, num_responses=g.num_responses, templates=templates,
        attacker_format=g.attacker_format, defender_format=g.defender_format,
        condition_on=j.condition_on, optimistic_attacker=g.optimistic_attacker,
        attacker_judge_enabled=j.attacker_judge, defender_judge_enabled=j.defender_judge,
        judge_mode=j.mode, swap_positions=j.swap_positions, faithfulness=g.faithfulness,
        num_faith_samples=j.num_faith_samples, faith_tie=j.get("faith_tie", "bad_judge"),
        selection=g.get("selection", "fallback"), attacker_sampling=params["attacker"],
        defender_sampling=params["defender"])


def player_max_new_tokens(config: Any, role: str) -> int:
    """``config.<role>.max_new_tokens``, or ``sampling.max_new_tokens`` when that is 0/absent."""
    own = int(config[role].get("max_new_tokens", 0) or 0) if role in config else 0
    return own or int(config.sampling.max_new_tokens)
