"""What the game loop does differently when one job runs on several processes (hosts).

Every process plays its own share of the rollout tree (its own seeds, sampler and judge
calls); the update step is one global program over the mesh. Around that, the processes must
agree on a few things, all here:

* records: each process's metrics record is all-gathered and merged (the mean over processes
  of each key, over those that have it) so the one writer (process 0) logs the whole job;
* the stop flag: a SIGTERM seen by any process stops all of them after the same step;
* data positions: every process's seed-iterator state goes into the checkpoint, and is
  given back to the process with the same index on resume;
* samplers: a JAX sampler runs on this process's own devices, so its weights are gathered
  from the global (sharded) params at every sync.

With one process every function here is the identity (no collective is issued).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import numpy as np

from advgame_jax import distributed


def multi() -> bool:
    return jax.process_count() > 1


def is_writer() -> bool:
    """Process 0 writes metrics, TensorBoard, the audit log and console progress."""
    return jax.process_index() == 0


def allgather_json(obj: Any) -> list:
    """Every process's JSON-serialisable ``obj``, in process order (a host collective)."""
    return distributed.allgather_json(obj)


def merge_records(record: Mapping[str, float]) -> dict:
    """The job-wide record: for each key, the mean over the processes that reported it.

    Rates and means from the rollout tree are per process over equal numbers of seeds, so
    their mean is the job's rate; update-step metrics are already global (identical on every
    process) and pass through unchanged.
    """
    if not multi():
        return dict(record)
    parts = allgather_json({k: (None if v is None else float(v)) for k, v in record.items()})
    out: dict = {}
    for key in sorted(set().union(*parts)):
        vals = [p[key] for p in parts if p.get(key) is not None and np.isfinite(p[key])]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def any_process(flag: bool) -> bool:
    """True everywhere when ``flag`` is True on any process."""
    return distributed.any_process(flag)


def gather_iterator_states(states: Mapping[str, dict]) -> Any:
    """Checkpoint form of the seed-iterator positions: the dict itself with one process (the
    single-process format), else ``{"per_process": [states of process 0, 1, ...]}``."""
    if not multi():
        return dict(states)
    return {"per_process": allgather_json(dict(states))}


def own_iterator_states(saved: Any) -> Any:
    """This process's iterator states from :func:`gather_iterator_states`' output, or None
    when the checkpoint was written by a different number of processes (the seed streams are
    sharded by process count, so positions do not carry over; the caller restarts them)."""
    if isinstance(saved, dict) and "per_process" in saved:
        per = saved["per_process"]
        if len(per) != jax.process_count():
            logging.warning(
                "checkpoint written by %d process(es), resumed with %d: seed "
                "iterators restart from their beginning",
                len(per),
                jax.process_count(),
            )
            return None
        return per[jax.process_index()]
    if multi():
        logging.warning(
            "checkpoint written by one process, resumed with %d: seed iterators "
            "restart from their beginning",
            jax.process_count(),
        )
        return None
    return saved


def local_copy(params):
    """Params for a sampler on this process's devices: the global arrays themselves with one
    process, else a full host copy gathered from every process's shards (a collective)."""
    if not multi():
        return params
    from advgame_jax.training.multihost import global_to_host

    # Processes arrive here at different times (process 0 also writes logs and checkpoints);
    # meet first, so the gather's device collective does not time out waiting.
    barrier("local_copy")
    return global_to_host(params)


_BARRIER_COUNT = [0]


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait (up to ``timeout_s``) until every process reaches ``name``.

    Uses the coordination service's barrier, which waits as long as asked (a device
    collective would give up after the collectives' own timeout while one process is still
    building, e.g., the toy world)."""
    if not multi():
        return
    from jax._src import distributed as jax_distributed

    client = getattr(jax_distributed.global_state, "client", None)
    if client is not None and hasattr(client, "wait_at_barrier"):
        _BARRIER_COUNT[0] += 1  # every process makes the same sequence of calls
        client.wait_at_barrier(f"advgame/{name}/{_BARRIER_COUNT[0]}", int(timeout_s * 1000))
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
