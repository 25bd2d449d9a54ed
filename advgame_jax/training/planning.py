"""Capacity plans of an experiment config: both players' update steps compiled (never run) on
the config's mesh, with per-device memory and a fits / does-not-fit verdict.

``launch/plan.py`` is the command line; ``docs/capacity.md`` is generated from its output.
Players' shapes come from ``config.json`` files only (see :func:`model_config_for`).
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
from advgame_jax.training import capacity as cap
from advgame_jax.training.update import update_step_from


def model_config_for(config, role: str, override: str = "") -> ModelConfig:
    """The role's shape: ``override``, else ``<role>.hf_path``, else the family's default
    file under ``configs/models/`` (see :func:`plan_inputs.model_path_for`)."""
    path = model_path_for(config, role, override)
    try:
        return ModelConfig.from_hf_file(path)
    except ValueError as err:
        raise PlanInputError(f"{role} model: {err}") from None


def player_rows(config, role: str, devices_in_batch: int) -> tuple[str, int]:
    """(batch kind, global rows) of one update of ``role`` in the paper's game."""
    from advgame_jax.experiment.validate import seeds_per_split

    b = seeds_per_split(config, devices_in_batch)
    a, d = int(config.game.num_attacks), int(config.game.num_responses)
    if config.loss.kind == "grpo":
        return "samples", b * a if role == "attacker" else b * a * d
    return "pairs", b if role == "attacker" else b * a


def player_training(config, role: str):
    """``role``'s update-step and state settings: the trainer's own mapping of the config
    (``experiment.update_settings.player_training``), so the plan compiles the program that
    trains."""
    from advgame_jax.experiment.update_settings import player_training as mapping

    return mapping(config, role)


def _state_bytes(config, role, model_config, mesh) -> int:
    t = player_training(config, role)
    return cap.per_device_bytes(
        cap.abstract_state(model_config, t.update.optim.build(), mesh, t.state)
    )


def player_program(config, role: str, model_config: ModelConfig, mesh, seq_len: int):
    """``(step, state, batch)``: ``role``'s update step as the trainer builds it
    (``training.update.update_step_from``) with an abstract state and the longest batch of
    the paper's game (:func:`player_rows`) at ``seq_len`` tokens; ``step.lower(state, batch)``
    is the program a plan compiles."""
    t = player_training(config, role)
    step = update_step_from(model_config, t.update, mesh=mesh)
    state = cap.abstract_state(model_config, step.optimizer, mesh, t.state)
    kind, rows = player_rows(config, role, step.data_parallel_size)
    return step, state, cap.abstract_batch(kind, rows, seq_len, mesh)


def plan_player(config, role: str, model_config: ModelConfig, mesh, seq_len: int) -> dict:
    step, state, batch = player_program(config, role, model_config, mesh, seq_len)
    report = cap.compile_report(step, state, batch)
    kind = "pairs" if batch.tokens.ndim == 3 else "samples"
    report.update(
        kind=kind,
        rows=int(batch.tokens.shape[0]),
        seq_len=seq_len,
        num_params=cap.tree_bytes(cap.abstract_params(model_config)) // 4,
    )
    return report


def plan_experiment(
    config,
    *,
    devices: int,
    device_memory_gib: float,
    seq_len: int = 4096,
    reserve_gib: float = 8.0,
    models: Optional[dict] = None,
) -> dict:
    """Compile both players' steps and decide whether the job fits (see launch/plan.py)."""
    models = models or {}
    if jax.device_count() < devices:
        raise PlanInputError(
            f"{devices} devices asked, {jax.device_count()} visible; set "
            f"--xla_force_host_platform_device_count before importing jax"
        )
    data, fsdp, tensor = resolve_mesh_shape(config.mesh, devices)
    mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=jax.devices()[:devices])
    gib = 1024**3
    shapes = {
        role: model_config_for(config, role, models.get(role, ""))
        for role in ("attacker", "defender")
    }
    # The states alone (no compile needed): if they do not fit, no step can.
    state_only = {role: _state_bytes(config, role, mc, mesh) for role, mc in shapes.items()}
    compile_steps = sum(state_only.values()) <= device_memory_gib * gib
    players, cache = {}, {}
    for role, mc in shapes.items():
        if not config[role].trainable or not compile_steps:
            players[role] = dict(
                frozen=not config[role].trainable,
                compiled=False,
                state_bytes_per_device=state_only[role],
                temp_bytes=0,
                num_params=cap.tree_bytes(cap.abstract_params(mc)) // 4,
            )
            continue
        key = (
            mc,
            player_rows(config, role, 1),
            config[role].compute_dtype,
            config[role].param_dtype,
        )
        if key not in cache:
            cache[key] = plan_player(config, role, mc, mesh, seq_len)
        players[role] = dict(cache[key], frozen=False, compiled=True)
    state = sum(p["state_bytes_per_device"] for p in players.values())
    temp = max(p["temp_bytes"] for p in players.values())
    need = state + temp + reserve_gib * gib
    budget = device_memory_gib * gib
    fits = need <= budget
    if fits:
        reason = (
            f"fits: states {state / gib:.1f} GiB + largest step temporaries "
            f"{temp / gib:.1f} GiB + reserve {reserve_gib:.1f} GiB = {need / gib:.1f} GiB "
            f"≤ {device_memory_gib:.1f} GiB per device"
        )
    else:
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
        reason = (
            f"does not fit: {what} need {need / gib:.1f} GiB per device (states "
            f"{state / gib:.1f} + temporaries {temp / gib:.1f} + reserve {reserve_gib:.1f})"
            f" > {device_memory_gib:.1f} GiB; {fix}"
        )
    return dict(
        config=str(config.name),
        devices=devices,
        mesh=dict(data=data, fsdp=fsdp, tensor=tensor),
        device_memory_gib=device_memory_gib,
        seq_len=seq_len,
        reserve_gib=reserve_gib,
        players=players,
        state_bytes_per_device=state,
        max_temp_bytes=temp,
        need_bytes=int(need),
        fits=fits,
        verdict=reason,
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
