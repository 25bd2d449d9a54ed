"""Capacity plans of an experiment config: both players' update steps compiled (never run) on
the config's mesh, with per-device memory and a fits / does-not-fit verdict.

``launch/plan.py`` is the command line; ``docs/capacity.md`` is generated from its output.
Players' shapes come from ``config.json`` files only (see :func:`model_config_for`); everything
else from the typed :class:`advgame_jax.settings.Settings` (``launch/plan.py`` converts the
ConfigDict once).
"""

from __future__ import annotations

from typing import Optional

import jax

from advgame_jax.models import ModelConfig, make_mesh
from advgame_jax.plan_inputs import (  # noqa: F401
    FAMILY_MODELS,
    PlanInputError,
    model_path_for,
    resolve_mesh_shape,
)
from advgame_jax.settings import ROLES, Settings
from advgame_jax.training import capacity as cap
from advgame_jax.training.update import update_step_from

GIB = 1024**3


def model_config_for(settings: Settings, role: str, override: str = "") -> ModelConfig:
    """The role's shape: ``override``, else ``<role>.hf_path``, else the family's default
    file under ``configs/models/`` (see :func:`plan_inputs.model_path_for`)."""
    path = model_path_for(
        role,
        hf_path=settings.player(role).hf_path,
        config_name=settings.name,
        override=override,
    )
    try:
        return ModelConfig.from_hf_file(path)
    except ValueError as err:
        raise PlanInputError(f"{role} model: {err}") from None


def player_rows(settings: Settings, role: str, devices_in_batch: int) -> tuple[str, int]:
    """(batch kind, global rows) of one update of ``role`` in the paper's game."""
    b = settings.train.seeds_per_split(devices_in_batch)
    a, d = settings.game.num_attacks, settings.game.num_responses
    if settings.loss.kind == "grpo":
        return "samples", b * a if role == "attacker" else b * a * d
    return "pairs", b if role == "attacker" else b * a


def player_training(settings: Settings, role: str):
    """``role``'s update-step and state settings: the trainer's own mapping of the settings
    (``experiment.update_settings.player_training``), so the plan compiles the program that
    trains."""
    from advgame_jax.experiment.update_settings import player_training as mapping

    return mapping(settings, role)


def _state_bytes(settings: Settings, role: str, model_config: ModelConfig, mesh) -> int:
    t = player_training(settings, role)
    return cap.per_device_bytes(
        cap.abstract_state(model_config, t.update.optim.build(), mesh, t.state)
    )


def player_program(settings: Settings, role: str, model_config: ModelConfig, mesh, seq_len: int):
    """``(step, state, batch)``: ``role``'s update step as the trainer builds it
    (``training.update.update_step_from``) with an abstract state and the longest batch of
    the paper's game (:func:`player_rows`) at ``seq_len`` tokens; ``step.lower(state, batch)``
    is the program a plan compiles."""
    t = player_training(settings, role)
    step = update_step_from(model_config, t.update, mesh=mesh)
    state = cap.abstract_state(model_config, step.optimizer, mesh, t.state)
    kind, rows = player_rows(settings, role, step.data_parallel_size)
    return step, state, cap.abstract_batch(kind, rows, seq_len, mesh)


def plan_player(
    settings: Settings, role: str, model_config: ModelConfig, mesh, seq_len: int
) -> dict:
    step, state, batch = player_program(settings, role, model_config, mesh, seq_len)
    report = cap.compile_report(step, state, batch)
    kind = "pairs" if batch.tokens.ndim == 3 else "samples"
    report.update(
        kind=kind,
        rows=int(batch.tokens.shape[0]),
        seq_len=seq_len,
        num_params=cap.tree_bytes(cap.abstract_params(model_config)) // 4,
    )
    return report


def _plan_players(
    settings: Settings, shapes: dict, mesh, *, seq_len: int, device_memory_gib: float
) -> dict:
    """Role -> its plan: the compiled step's report, or the state alone for a frozen player
    (or when the two states alone already exceed the device: no step can fit then). Players
    of one shape, batch and precision share one compile."""
    state_only = {role: _state_bytes(settings, role, mc, mesh) for role, mc in shapes.items()}
    compile_steps = sum(state_only.values()) <= device_memory_gib * GIB
    players, cache = {}, {}
    for role, mc in shapes.items():
        p = settings.player(role)
        if not p.trainable or not compile_steps:
            players[role] = dict(
                frozen=not p.trainable,
                compiled=False,
                state_bytes_per_device=state_only[role],
                temp_bytes=0,
                num_params=cap.tree_bytes(cap.abstract_params(mc)) // 4,
            )
            continue
        key = (mc, player_rows(settings, role, 1), p.compute_dtype, p.param_dtype)
        if key not in cache:
            cache[key] = plan_player(settings, role, mc, mesh, seq_len)
        players[role] = dict(cache[key], frozen=False, compiled=True)
    return players


def _verdict(state: int, temp: int, reserve_gib: float, device_memory_gib: float) -> str:
    """Fits / does not fit, with the sum and what to change."""
    need = state + temp + reserve_gib * GIB
    budget = device_memory_gib * GIB
    if need <= budget:
        return (
            f"fits: states {state / GIB:.1f} GiB + largest step temporaries "
            f"{temp / GIB:.1f} GiB + reserve {reserve_gib:.1f} GiB = {need / GIB:.1f} GiB "
            f"≤ {device_memory_gib:.1f} GiB per device"
        )
    if state > budget:
        what, fix = (
            "the two players' states alone",
            "shard the state over more devices (--config.mesh.fsdp)",
        )
    else:
        what, fix = (
            "states + step temporaries",
            "the step's temporaries are too large: "
            "lower --config.train.max_tokens_per_device or use more devices",
        )
    return (
        f"does not fit: {what} need {need / GIB:.1f} GiB per device (states "
        f"{state / GIB:.1f} + temporaries {temp / GIB:.1f} + reserve {reserve_gib:.1f})"
        f" > {device_memory_gib:.1f} GiB; {fix}"
    )


def plan_experiment(
    settings: Settings,
    *,
    devices: int,
    device_memory_gib: float,
    seq_len: int = 4096,
    reserve_gib: float = 8.0,
    models: Optional[dict] = None,
) -> dict:
    """Compile both players' steps and decide whether the job fits (see launch/plan.py);
    ``models``: role -> a ``config.json`` path overriding the settings' shape."""
    models = models or {}
    if jax.device_count() < devices:
        raise PlanInputError(
            f"{devices} devices asked, {jax.device_count()} visible; set "
            f"--xla_force_host_platform_device_count before importing jax"
        )
    data, fsdp, tensor = resolve_mesh_shape(settings.mesh, devices)
    mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=jax.devices()[:devices])
    shapes = {role: model_config_for(settings, role, models.get(role, "")) for role in ROLES}
    players = _plan_players(
        settings, shapes, mesh, seq_len=seq_len, device_memory_gib=device_memory_gib
    )
    state = sum(p["state_bytes_per_device"] for p in players.values())
    temp = max(p["temp_bytes"] for p in players.values())
    need = state + temp + reserve_gib * GIB
    return dict(
        config=str(settings.name),
        devices=devices,
        mesh=dict(data=data, fsdp=fsdp, tensor=tensor),
        device_memory_gib=device_memory_gib,
        seq_len=seq_len,
        reserve_gib=reserve_gib,
        players=players,
        state_bytes_per_device=state,
        max_temp_bytes=temp,
        need_bytes=int(need),
        fits=need <= device_memory_gib * GIB,
        verdict=_verdict(state, temp, reserve_gib, device_memory_gib),
    )


def format_plan(plan: dict, top: int = 4) -> str:
    """Human-readable plan: per player bytes and collectives, then the verdict."""
    gib = 1024**3
    m = plan["mesh"]
    lines = [
        f"plan {plan['config']}: {plan['devices']} devices (data={m['data']} "
        f"fsdp={m['fsdp']} tensor={m['tensor']}), {plan['device_memory_gib']:.1f} GiB each, "
        f"sequence {plan['seq_len']}"
    ]
    for role, p in plan["players"].items():
        if not p.get("compiled"):
            what = "frozen, params" if p.get("frozen") else "state (step not compiled)"
            lines.append(
                f"  {role}: {p['num_params'] / 1e9:.2f}B params, {what} "
                f"{p['state_bytes_per_device'] / gib:.2f} GiB per device"
            )
            continue
        lines.append(
            f"  {role}: {p['num_params'] / 1e9:.2f}B params, {p['rows']} {p['kind']} global; per "
            f"device: arguments {p['argument_bytes'] / gib:.2f} GiB (state "
            f"{p['state_bytes_per_device'] / gib:.2f}), outputs {p['output_bytes'] / gib:.2f} "
            f"GiB, temporaries {p['temp_bytes'] / gib:.2f} GiB; compile {p['compile_s']:.1f} s"
        )
        for c in p["collectives"][:top]:
            lines.append(
                f"      {c['kind']} {', '.join(c['shapes'])} ({c['bytes'] / 2**20:.0f} MiB)"
            )
    lines.append(plan["verdict"])
    return "\n".join(lines)
