"""Token-level records that cross the boundary between the game and training.

The game (``advgame_jax.game``) builds these from rollout trees; training
(``advgame_jax.training``) collates them into padded, bucketed arrays. Neither side imports
the other: both import only this module. Token ids are the ones the sampler produced, so no
re-tokenisation can shift a completion boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence


@dataclasses.dataclass(frozen=True)
class TokenPair:
    """One DPO/IPO preference pair: a shared prompt and two completions.

    ``prompt_ids``: the chat-templated prompt (attacker: templated seed prompt; defender:
    templated attack ``x``). ``chosen_ids`` / ``rejected_ids``: raw completion tokens (the
    loss is taken on these only). ``rejected_ids`` is already truncated to the chosen length
    when the spec asks for it (GAME_SPEC §2.10).

    ``weight``: this pair's coefficient in the update objective ``Σ_i weight_i · loss_i``
    (the gradient normaliser, decided game-side); None means ``1 / (number of pairs in the
    update batch)``, a plain mean over pairs.
    """

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    weight: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class TokenSample:
    """One GRPO sample: prompt, completion, its advantage and the sampler's log-probs.

    ``sampler_logprobs`` (one per completion token, or None) feed truncated importance
    sampling against the sampler's distribution (GAME_SPEC §2.11). ``weight``: as for
    :class:`TokenPair` (None: ``1 / number of samples in the update batch``).
    """

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    advantage: float
    sampler_logprobs: Optional[tuple[float, ...]] = None
    weight: Optional[float] = None


def as_ids(seq: Sequence[int]) -> tuple[int, ...]:
    """Normalise a token-id sequence (list, tuple, numpy array) to a tuple of Python ints."""
    return tuple(int(t) for t in seq)
