"""One game over many hosts: who this process is, joining the world, the hybrid mesh.

JAX's multi-controller runtime is the distributed engine: every host runs the same program
over one global mesh. This module owns the three things that differ from a single process:

* :func:`detect_world` reads the launcher's environment (pure: give it a dict) — explicit
  ``ADVGAME_*`` variables or config fields, Slurm (``SLURM_NTASKS`` / ``SLURM_PROCID`` /
  ``SLURM_STEP_NODELIST``), or a Cloud TPU VM pod (JAX finds its peers itself) — and
  returns a :class:`World`, or None for a plain single process;
* :func:`initialize` calls ``jax.distributed.initialize`` for that world (CPU processes use
  the gloo collectives) and checks that what JAX sees matches what the config asked for;
* :func:`build_mesh` lays out ``(data, fsdp, tensor)`` as ICI × DCN sizes: each axis is
  ``ici[a] × dcn[a]`` devices, the ``dcn`` part across hosts (slow links: inter-node or
  across TPU slices) and the ``ici`` part inside one (NVLink / ICI).

Plus the small cross-process agreements the loop needs (:func:`any_process`,
:func:`is_writer`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Mapping, Optional, Sequence

from advgame_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_PORT = 8476


class WorldError(UserError, RuntimeError):
    """The launcher's environment or the devices JAX sees do not match the config."""


@dataclasses.dataclass(frozen=True)
class World:
    """How to join: ``coordinator`` ("host:port"; None lets JAX auto-detect, as on TPU pods),
    ``num_processes``, ``process_id`` (None: auto-detect) and where the values came from."""

    coordinator: Optional[str]
    num_processes: Optional[int]
    process_id: Optional[int]
    source: str


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``"gpu[03-05,9],cpu1"`` → ``"gpu03"``."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise WorldError(f"SLURM node list {nodelist!r}: expected e.g. 'node[01-04]' or 'a,b'")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as e:
        raise WorldError(f"environment variable {name}={env[name]!r}: expected an integer") from e


def detect_world(
    env: Optional[Mapping[str, str]] = None,
    *,
    coordinator: str = "",
    num_processes: int = 0,
    process_id: int = -1,
) -> Optional[World]:
    """The world this process belongs to, or None for a single process.

    Precedence: an explicit ``coordinator`` (the config's ``distributed.*``; then
    ``num_processes`` and ``process_id`` are required) > ``ADVGAME_COORDINATOR``
    / ``ADVGAME_NUM_PROCESSES`` / ``ADVGAME_PROCESS_ID`` > Slurm with more than one task
    (coordinator = first node of the step's node list, port ``ADVGAME_COORDINATOR_PORT`` or
    8476) > a TPU VM pod (``TPU_WORKER_HOSTNAMES`` with several hosts: JAX detects the rest).
    """
    env = os.environ if env is None else env
    if coordinator:
        if not (num_processes >= 1 and 0 <= process_id < num_processes):
            raise WorldError(
                f"config.distributed: coordinator={coordinator!r}, num_processes={num_processes}, "
                f"process_id={process_id}; expected all three (a 'host:port', a count ≥ 1 and an "
                f"id in [0, num_processes))"
            )
        return World(coordinator, num_processes, process_id, "config")
    if "ADVGAME_COORDINATOR" in env:
        missing = [k for k in ("ADVGAME_NUM_PROCESSES", "ADVGAME_PROCESS_ID") if k not in env]
        if missing:
            raise WorldError(f"ADVGAME_COORDINATOR is set but {', '.join(missing)} is not")
        n, i = _int_env(env, "ADVGAME_NUM_PROCESSES"), _int_env(env, "ADVGAME_PROCESS_ID")
        if not (n >= 1 and 0 <= i < n):
            raise WorldError(
                f"ADVGAME_PROCESS_ID={i} with ADVGAME_NUM_PROCESSES={n}: expected 0 ≤ id < count"
            )
        return World(env["ADVGAME_COORDINATOR"], n, i, "env")
    if "SLURM_NTASKS" in env and _int_env(env, "SLURM_NTASKS") > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise WorldError(
                "Slurm job with several tasks but no SLURM_STEP_NODELIST / "
                "SLURM_JOB_NODELIST: launch the trainer with srun"
            )
        port = (
            _int_env(env, "ADVGAME_COORDINATOR_PORT")
            if "ADVGAME_COORDINATOR_PORT" in env
            else DEFAULT_PORT
        )
        return World(
            f"{first_slurm_host(nodelist)}:{port}",
            _int_env(env, "SLURM_NTASKS"),
            _int_env(env, "SLURM_PROCID"),
            "slurm",
        )
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return World(None, None, None, "tpu")
    return None


def initialize(
    world: Optional[World], *, expect_processes: int = 0, expect_devices: int = 0
) -> None:
    """Join ``world`` (no-op for None) and check the result.

    ``expect_processes`` / ``expect_devices`` (0: no check) come from the config; a mismatch
    with what JAX reports raises :class:`WorldError` naming both numbers. Must run before
    anything else touches JAX's backends.
    """
    import jax

    if world is not None:
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if world.coordinator is not None:
            jax.distributed.initialize(
                coordinator_address=world.coordinator,
                num_processes=world.num_processes,
                process_id=world.process_id,
            )
        else:  # JAX detects the cluster itself (Cloud TPU pods)
            jax.distributed.initialize()
    if expect_processes and jax.process_count() != expect_processes:
        raise WorldError(
            f"config.distributed.num_processes={expect_processes} but JAX sees "
            f"{jax.process_count()} process(es) (world from "
            f"{world.source if world else 'a single process'})"
        )
    if expect_devices and jax.device_count() != expect_devices:
        raise WorldError(
            f"the mesh needs {expect_devices} devices but JAX sees "
            f"{jax.device_count()} ({jax.process_count()} process(es) × "
            f"{jax.local_device_count()} local)"
        )


def resolve_axis_sizes(
    ici: Mapping[str, int], dcn: Mapping[str, int], *, num_devices: int, num_slices: int
) -> tuple[dict, dict]:
    """Fill one ``-1`` in ``ici`` (devices per host/slice left over) and check the layout.

    ``num_slices`` is the number of DCN-connected groups (hosts for GPUs/CPUs, slices for
    TPUs). Returns complete ``(ici, dcn)`` dicts over :data:`MESH_AXES`.
    """
    ici = {a: int(ici.get(a, 1)) for a in MESH_AXES}
    dcn = {a: int(dcn.get(a, 1)) for a in MESH_AXES}
    if any(v < 1 for v in dcn.values()):
        raise WorldError(f"config.mesh dcn sizes {dcn}: expected integers ≥ 1")
    n_dcn = math.prod(dcn.values())
    if n_dcn != num_slices:
        raise WorldError(
            f"config.mesh: dcn sizes {dcn} multiply to {n_dcn} but there are "
            f"{num_slices} host(s)/slice(s)"
        )
    per_slice = num_devices // num_slices
    free = [a for a in MESH_AXES if ici[a] == -1]
    if len(free) > 1 or any(v < 1 and v != -1 for v in ici.values()):
        raise WorldError(f"config.mesh ici sizes {ici}: expected integers ≥ 1, at most one -1")
    fixed = math.prod(v for a, v in ici.items() if a not in free)
    if free:
        if per_slice % fixed:
            raise WorldError(
                f"config.mesh: {per_slice} devices per host/slice are not "
                f"divisible by the fixed ici sizes (product {fixed})"
            )
        ici[free[0]] = per_slice // fixed
    if math.prod(ici.values()) != per_slice:
        raise WorldError(
            f"config.mesh: ici sizes {ici} multiply to {math.prod(ici.values())} "
            f"but each host/slice has {per_slice} devices"
        )
    return ici, dcn


def num_slices(devices) -> int:
    """DCN groups among ``devices``: TPU slices when devices carry ``slice_index``, else
    processes (one GPU/CPU host each)."""
    if _by_slice(devices):
        return len({d.slice_index for d in devices})
    return len({d.process_index for d in devices})


def _by_slice(devices) -> bool:
    return all(d.platform == "tpu" and getattr(d, "slice_index", None) is not None for d in devices)


def build_mesh(
    ici: Mapping[str, int],
    dcn: Optional[Mapping[str, int]] = None,
    devices: Optional[Sequence] = None,
):
    """A ``(data, fsdp, tensor)`` ``Mesh`` (Auto axis types) of ``ici × dcn`` devices.

    With one host/slice this is the plain device grid. With several, JAX's hybrid mesh
    utility places the ``dcn`` factor of each axis across hosts/slices and the ``ici`` factor
    inside them, so e.g. ``ici={'fsdp': 8}, dcn={'data': 2}`` runs FSDP inside each node
    and data parallelism across the two nodes.
    """
    import jax
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    devices = list(jax.devices() if devices is None else devices)
    slices = num_slices(devices)
    ici, dcn = resolve_axis_sizes(ici, dcn or {}, num_devices=len(devices), num_slices=slices)
    shape = tuple(ici[a] for a in MESH_AXES)
    dcn_shape = tuple(dcn[a] for a in MESH_AXES)
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:  # one host / one TPU slice: the topology-aware single-granule layout
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    # Each host's (or slice's) devices ordered by its own topology, the granules tiled by dcn.
    grid = mesh_utils.create_hybrid_device_mesh(
        shape, dcn_shape, devices, process_is_granule=not _by_slice(devices)
    )
    return Mesh(grid, MESH_AXES, axis_types=auto)


def is_writer() -> bool:
    """True on the one process that writes metrics, logs and console output (process 0)."""
    import jax

    return jax.process_index() == 0


_GATHER_COUNTER = [0]


def allgather_json(obj, *, timeout_s: float = 3600.0) -> list:
    """Every process's JSON-serialisable ``obj``, in process order (one entry per process).

    Goes through the coordination service's key-value store, not a device collective:
    processes reach the loop's agreement points at very different times (each plays its own
    rollouts), and a device collective gives up after its own short timeout. Every process
    must make the same sequence of calls."""
    import json

    import jax

    if jax.process_count() == 1:
        return [obj]
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise WorldError("allgather_json: jax.distributed is not initialised")
    n = _GATHER_COUNTER[0]
    _GATHER_COUNTER[0] += 1
    me = jax.process_index()
    client.key_value_set(f"advgame/gather/{n}/{me}", json.dumps(obj))
    out = [
        json.loads(client.blocking_key_value_get(f"advgame/gather/{n}/{p}", int(timeout_s * 1000)))
        for p in range(jax.process_count())
    ]
    if n > 0:  # everyone has finished reading the previous round once all wrote this one
        client.key_value_delete(f"advgame/gather/{n - 1}/{me}")
    return out


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (e.g. a SIGTERM seen by one host),
    so all of them stop at the same step. A no-op with one process."""
    return any(allgather_json(bool(flag)))
