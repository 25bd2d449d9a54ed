"""The gradient normaliser of each update, decided game-side (GAME_SPEC §2.11 and §2b).

The update step minimises ``Σ_i weight_i · loss_i`` over the pairs (DPO/IPO) or samples
(GRPO) of one split; this module computes the weight every record of a split gets:

- ``"pairs"``: no weight (``None``): the update step divides by the number of records, a plain
  mean over the pairs that exist.
- ``"reference"``: the reference implementation's normaliser. It collates a split's pairs per
  microbatch of seeds (and per device) and divides the summed loss by the rows of all those
  microbatches, where a microbatch without any pair still holds one dummy row with zero loss.
  So ``weight = 1 / Σ_microbatches max(pairs in the microbatch, 1)``. With the paper's layout
  (four microbatches of one seed each, ``seeds_per_microbatch = 1``) that is ``Σ / seeds`` for
  the attacker (at most one pair per seed) and ``Σ / Σ_b max(pairs_b, 1)`` for the defender.
  GRPO divides by every slot of the tree, ``B·A`` (attacker) or ``B·A·D`` (defender): samples
  that are not trained on (invalid, excluded) count as zero-loss rows.

Microbatches are taken as consecutive groups of ``seeds_per_microbatch`` seeds in batch order
(the last group may be shorter). Pure functions of plain values.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Optional, Sequence, TypeVar

from advgame_jax.game import rewards
from advgame_jax.game.tree import ScoredTree

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

NORMALIZATIONS = ("reference", "pairs")
R = TypeVar("R", bound="DataclassInstance")


def reference_normaliser(pairs_per_seed: Sequence[int], seeds_per_microbatch: int) -> int:
    """``Σ_groups max(Σ pairs of the group's seeds, 1)`` over consecutive groups of
    ``seeds_per_microbatch`` seeds. An empty batch gives 0 (nothing to normalise)."""
    if seeds_per_microbatch < 1:
        raise ValueError(f"seeds_per_microbatch must be >= 1, got {seeds_per_microbatch!r}")
    k = seeds_per_microbatch
    return sum(max(sum(pairs_per_seed[i : i + k]), 1) for i in range(0, len(pairs_per_seed), k))


def pairs_per_seed(scored: ScoredTree, role: str) -> list[int]:
    """Number of DPO/IPO pairs each seed of ``scored`` gives ``role``."""
    if role not in ("attacker", "defender"):
        raise ValueError(f"role must be 'attacker' or 'defender', got {role!r}")
    B = scored.shape[0]
    idx = rewards.pair_indices(scored, role)
    counts = collections.Counter(i[0] for i in idx)
    return [counts[b] for b in range(B)]


def pair_weight(
    scored: ScoredTree, role: str, normalization: str, seeds_per_microbatch: int = 1
) -> Optional[float]:
    """The weight of each of ``role``'s pairs in this split (None: plain mean)."""
    _check(normalization)
    if normalization == "pairs":
        return None
    n = reference_normaliser(pairs_per_seed(scored, role), seeds_per_microbatch)
    return 1.0 / n if n else None


def sample_weight(scored: ScoredTree, role: str, normalization: str) -> Optional[float]:
    """The weight of each of ``role``'s GRPO samples in this split (None: plain mean)."""
    _check(normalization)
    if normalization == "pairs":
        return None
    B, A, D = scored.shape
    slots = {"attacker": B * A, "defender": B * A * D}[role]
    return 1.0 / slots if slots else None


def with_weight(records: Sequence[R], weight: Optional[float]) -> list[R]:
    """``records`` (TokenPair / TokenSample) with ``weight`` set on each."""
    return [dataclasses.replace(r, weight=weight) for r in records]


def _check(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"loss normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
        )
