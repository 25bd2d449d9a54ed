"""Global update batches from process-local rollouts (multi-host training).

Each process plays its own part of the rollout tree and so holds a different number of pairs
(or samples) of different lengths. The jitted update step needs ONE global array of one shape,
so before collating the processes agree (one small all-gather of three integers) on:

* the global row bucket ``G`` (from the largest local count × process count, rounded as
  ``collate_*`` rounds rows) — each process fills ``G / P`` rows, padding the rest;
* the length bucket (from the longest local sequence);
* the objective weights: a record without an explicit ``weight`` gets ``1 / (global number
  of records)``, so the objective is the mean over the GLOBAL batch, not over each host's.
  Explicit weights are each process's own normaliser (as a data-parallel rank normalises its
  loss); they are divided by the number of processes, as ranks average their gradients.

Each process then collates its rows locally and the leaves become global ``jax.Array`` s via
``jax.make_array_from_process_local_data`` with the batch's row sharding: process ``p``'s
rows are rows ``[p·G/P, (p+1)·G/P)`` of the global batch, held by its own devices only (no
host ever materialises the global batch). With one process this is ordinary collation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np

from advgame_jax.models import DEFAULT_RULES
from advgame_jax.training.batching import collate_pairs, collate_samples, length_bucket, row_bucket
from advgame_jax.training.sharding import batch_parallel_size, batch_shardings


def allgather_ints(values: Sequence[int]) -> np.ndarray:
    """``[num_processes, len(values)]`` int64: every process's ``values`` (host collective)."""
    from advgame_jax.distributed import allgather_json

    return np.asarray(allgather_json([int(v) for v in values]), np.int64).reshape(
        jax.process_count(), -1
    )


def _longest(records, kind: str) -> int:
    if kind == "pairs":
        return max(
            (len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids)) for r in records),
            default=1,
        )
    return max((len(r.prompt_ids) + len(r.completion_ids) for r in records), default=1)


def plan_global(
    counts: np.ndarray,
    longest: int,
    *,
    num_processes: int,
    multiple: int,
    row_buckets: Sequence[int] = (),
    length_buckets: Sequence[int] = (),
    max_length=None,
) -> tuple[int, int]:
    """``(local_rows, T)``: rows per process and the shared length bucket (pure; see module)."""
    if multiple % num_processes:
        raise ValueError(
            f"data-parallel size × microbatches = {multiple} is not a multiple of "
            f"the {num_processes} processes: each process must own whole rows"
        )
    global_rows = row_bucket(int(np.max(counts)) * num_processes, multiple, row_buckets)
    if global_rows % num_processes:
        raise ValueError(f"row bucket {global_rows} does not split over {num_processes} processes")
    cap = max(length_buckets) if length_buckets else max_length
    t = (
        cap
        if cap is not None and longest > cap
        else length_bucket(max(longest, 1), length_buckets, max_length)
    )
    return global_rows // num_processes, t


@dataclasses.dataclass(frozen=True)
class Bucketing:
    """How :func:`collate_global` shapes a batch: ``num_microbatches`` (rows are a multiple of
    it times the data-parallel size), the allowed global row counts and sequence lengths
    (empty: powers of two), the longest sequence kept, and what to do with a longer one
    (``overflow``: ``'error'`` or ``'truncate_prompt'``)."""

    num_microbatches: int = 1
    row_buckets: Sequence[int] = ()
    length_buckets: Sequence[int] = ()
    max_length: Optional[int] = None
    overflow: str = "error"


def collate_global(
    records: Sequence,
    *,
    kind: str,
    pad_id: int,
    mesh,
    bucketing: Bucketing = Bucketing(),
    rules=DEFAULT_RULES,
):
    """This process's ``records`` (TokenPair for ``kind='pairs'``, TokenSample for
    ``'samples'``) → a global PairBatch / SampleBatch of ``jax.Array`` s on ``mesh``, shaped
    by ``bucketing``.

    Every process must call it (collectively), in the same order, with its own records.
    Explicit ``weight`` s must then be set on all records of all processes or on none.
    """
    num_microbatches, max_length = bucketing.num_microbatches, bucketing.max_length
    if kind not in ("pairs", "samples"):
        raise ValueError(f"kind must be 'pairs' or 'samples', got {kind!r}")
    n_proc = jax.process_count()
    dp = batch_parallel_size(mesh, rules)
    records, counts, longest = _agree_on_weights(records, kind, n_proc)
    local_rows, t = plan_global(
        counts,
        longest,
        num_processes=n_proc,
        multiple=num_microbatches * dp,
        row_buckets=bucketing.row_buckets,
        length_buckets=bucketing.length_buckets,
        max_length=max_length,
    )
    local_dp = dp // n_proc if dp % n_proc == 0 else dp
    # Any: the values' types differ; the collate functions' signatures check each one.
    common: dict[str, Any] = dict(
        pad_id=pad_id,
        length_buckets=(t,),
        num_microbatches=num_microbatches,
        data_parallel_size=max(local_dp, 1),
        max_length=max_length,
        overflow=bucketing.overflow,
    )
    if kind == "pairs":
        local = collate_pairs(records, pair_buckets=(local_rows,), **common)
    else:
        local = collate_samples(records, sample_buckets=(local_rows,), **common)
    if n_proc == 1:
        return local
    return _local_to_global(local, mesh, rules, n_proc)


def _agree_on_weights(records: Sequence, kind: str, n_proc: int):
    """``(records with their objective weights, [P] record counts, longest sequence)``: one
    all-gather of every process's count, longest sequence and whether it has weights."""
    explicit = [r.weight is not None for r in records]
    if any(explicit) and not all(explicit):
        raise ValueError("collate_global: some records carry a weight and some do not")
    info = allgather_ints(
        [
            len(records),
            _longest(records, kind),
            int(any(explicit)),
            int(bool(records) and not all(explicit)),
        ]
    )
    counts, longest = info[:, 0], int(np.max(info[:, 1]))
    if np.any(info[:, 2]) and np.any(info[:, 3]):
        raise ValueError("collate_global: processes disagree on whether records carry weights")
    if not np.any(info[:, 2]):
        total = max(int(np.sum(counts)), 1)
        records = [dataclasses.replace(r, weight=1.0 / total) for r in records]
    elif n_proc > 1:
        records = [dataclasses.replace(r, weight=r.weight / n_proc) for r in records]
    return records, counts, longest


def _local_to_global(local, mesh, rules, n_proc: int):
    """Each process's rows of the batch → global ``jax.Array`` s (process p: rows
    ``[p·G/P, (p+1)·G/P)``), held by its own devices only."""
    global_shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] * n_proc,) + x.shape[1:], x.dtype), local
    )
    shardings = batch_shardings(global_shapes, mesh, rules)

    def to_global(x, sharding):
        shape = (x.shape[0] * n_proc,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(to_global, local, shardings)


def host_to_global(tree, shardings):
    """Place a host pytree that every process holds identically (e.g. params initialised from
    the same key) onto global ``shardings``; each process fills only its own devices."""

    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def global_to_host(tree):
    """A full numpy copy of a pytree of (possibly multi-process) global arrays, on every
    process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree
    )
