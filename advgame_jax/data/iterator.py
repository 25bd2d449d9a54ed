"""Deterministic, resumable, per-host sharded batches of seeds of one category.

Stream model: epoch ``e`` is the permutation ``perm_e`` of all N seeds drawn from
``numpy.random.default_rng([seed, e])``; shard ``k`` of ``K`` owns ``perm_e[k::K]`` (the shards
of an epoch are disjoint and together cover it). A shard's stream is its slices of epochs
0, 1, 2, ... concatenated, and ``next_batch`` takes the next ``batch_size`` seeds of that
stream, crossing epoch boundaries, so every call on every host returns a full batch.

The whole position is ``(epoch, position)`` (``position`` indexes the shard's slice of the
current epoch): ``state()`` is a small JSON-serialisable dict and ``restore(state)`` resumes
the identical continuation.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from advgame_jax.data.seeds import Seed


class SeedIterator:
    """``next_batch() -> list[Seed]`` of length ``batch_size``; see the module docstring."""

    def __init__(
        self,
        seeds: Sequence[Seed],
        batch_size: int,
        *,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        seeds = list(seeds)
        if not seeds:
            raise ValueError("SeedIterator: seeds is empty; expected at least one seed")
        categories = {s.category for s in seeds}
        if len(categories) != 1:
            raise ValueError(
                f"SeedIterator: seeds mix categories {sorted(categories)}; expected one category "
                "per iterator (harmful and benign batches are drawn separately)"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"SeedIterator: batch_size={batch_size!r}; expected an int >= 1")
        if not isinstance(shard_count, int) or shard_count < 1:
            raise ValueError(f"SeedIterator: shard_count={shard_count!r}; expected an int >= 1")
        if not isinstance(shard_index, int) or not 0 <= shard_index < shard_count:
            raise ValueError(
                f"SeedIterator: shard_index={shard_index!r}; expected an int in [0, {shard_count})"
            )
        if shard_count > len(seeds):
            raise ValueError(
                f"SeedIterator: shard_count={shard_count} exceeds the {len(seeds)} seeds; "
                "expected at least one seed per shard"
            )
        self._seeds = seeds
        self.category = seeds[0].category
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shard_index = shard_index
        self.shard_count = shard_count
        self._epoch = 0
        self._position = 0
        self._order = self._shard_order(0)

    def _shard_order(self, epoch: int) -> np.ndarray:
        """Indices into ``seeds`` this shard visits in ``epoch``, in order. Shape [~N/K]."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self._seeds))
        return perm[self.shard_index :: self.shard_count]

    def epoch_indices(self, epoch: int) -> list[int]:
        """This shard's seed indices for ``epoch`` (for inspection and tests)."""
        return [int(i) for i in self._shard_order(epoch)]

    @property
    def epoch(self) -> int:
        return self._epoch

    def next_batch(self) -> list[Seed]:
        batch: list[Seed] = []
        while len(batch) < self.batch_size:
            if self._position == len(self._order):
                self._epoch += 1
                self._position = 0
                self._order = self._shard_order(self._epoch)
            take = min(self.batch_size - len(batch), len(self._order) - self._position)
            idx = self._order[self._position : self._position + take]
            batch.extend(self._seeds[int(i)] for i in idx)
            self._position += take
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position plus what it is only valid for."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "shard_index": self.shard_index,
            "shard_count": self.shard_count,
            "num_seeds": len(self._seeds),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from ``state()``; a state taken from a different stream is rejected."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"SeedIterator.restore: state {state!r}; expected a dict with int 'epoch' and 'position'"
            ) from err
        for key, mine in (
            ("seed", self.seed),
            ("shard_index", self.shard_index),
            ("shard_count", self.shard_count),
            ("num_seeds", len(self._seeds)),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"SeedIterator.restore: state[{key!r}]={state[key]!r} but this iterator has {mine!r}"
                )
        order = self._shard_order(epoch) if epoch >= 0 else np.empty(0, np.int64)
        if epoch < 0 or not 0 <= position <= len(order):
            raise ValueError(
                f"SeedIterator.restore: epoch={epoch}, position={position}; expected epoch >= 0 "
                f"and 0 <= position <= {len(order)}"
            )
        self._epoch, self._position, self._order = epoch, position, order
