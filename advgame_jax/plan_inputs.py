"""The planner's inputs checked before JAX starts: flag values, the output path, the mesh
section and where each player's ``config.json`` comes from (plain values and typed sections,
never the ConfigDict: ``launch/plan.py`` reads those fields).

Nothing here imports JAX, so ``launch/plan.py`` can refuse a bad flag in milliseconds, before
the device count reaches ``XLA_FLAGS`` (each virtual CPU device costs host memory: a huge count
used to exhaust the machine before any message). Every refusal is one ``PlanInputError``
(a ``UserError``) naming the flag or field and what was expected.
"""

from __future__ import annotations

import json
import math
import os

from advgame_jax.errors import UserError
from advgame_jax.settings import MeshSettings

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY_MODELS = {"llama": "llama3.1_8b", "qwen": "qwen2.5_7b"}
# Virtual CPU devices are real XLA clients with their own thread pools and allocators: a plan
# for more than this many devices is refused (the largest job this project plans for is a
# 64-chip TPU slice; a 1,024-device mesh already takes minutes to compile on a laptop).
MAX_DEVICES = 1024
MAX_SEQ_LEN = 1 << 20


class PlanInputError(UserError, ValueError):
    """A planner flag, config field or model file that cannot be planned; one line."""


def _finite(name: str, value, *, minimum: float, strict: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PlanInputError(f"--{name}={value!r}: expected a number") from None
    if not math.isfinite(v) or (v <= minimum if strict else v < minimum):
        rel = ">" if strict else "≥"
        raise PlanInputError(f"--{name}={value}: expected a finite number {rel} {minimum:g}")
    return v


def check_devices(devices) -> int:
    """The trainer's device count: an integer in [1, MAX_DEVICES]."""
    try:
        n = int(devices)
    except (TypeError, ValueError):
        raise PlanInputError(f"--devices={devices!r}: expected an integer") from None
    if n < 1:
        raise PlanInputError(f"--devices={n}: expected at least 1 device")
    if n > MAX_DEVICES:
        raise PlanInputError(
            f"--devices={n}: at most {MAX_DEVICES} devices can be planned (each is a virtual CPU "
            f"device with its own memory and threads on this machine); plan the per-node or "
            f"per-slice mesh instead"
        )
    return n


def check_json_path(path: str) -> str:
    """``--json``: a file path whose directory exists and is writable (checked before any
    plan is computed, so a typo does not cost the whole compile)."""
    if not path:
        return ""
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if os.path.isdir(full):
        raise PlanInputError(f"--json={path}: is a directory; expected a file path")
    if not os.path.isdir(parent):
        raise PlanInputError(f"--json={path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (
        os.path.exists(full) and not os.access(full, os.W_OK)
    ):
        raise PlanInputError(f"--json={path}: not writable")
    return full


def check_flags(*, devices, device_memory_gib, seq_len, reserve_gib, json_path="") -> dict:
    """Every numeric flag of the memory plan, checked; returns them normalised."""
    n = check_devices(devices)
    mem = _finite("device_memory_gib", device_memory_gib, minimum=0.0, strict=True)
    reserve = _finite("reserve_gib", reserve_gib, minimum=0.0, strict=False)
    if reserve >= mem:
        raise PlanInputError(
            f"--reserve_gib={reserve:g} leaves nothing of the "
            f"--device_memory_gib={mem:g} per device; expected reserve < memory"
        )
    try:
        t = int(seq_len)
    except (TypeError, ValueError):
        raise PlanInputError(f"--seq_len={seq_len!r}: expected an integer") from None
    if not 1 <= t <= MAX_SEQ_LEN:
        raise PlanInputError(f"--seq_len={t}: expected 1 ≤ seq_len ≤ {MAX_SEQ_LEN}")
    return dict(
        devices=n,
        device_memory_gib=mem,
        seq_len=t,
        reserve_gib=reserve,
        json_path=check_json_path(json_path),
    )


def resolve_mesh_shape(mesh: MeshSettings, n: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) of the ``mesh`` section on ``n`` devices; one axis may be -1 (the
    rest)."""
    try:
        sizes = {a: int(getattr(mesh, a)) for a in ("data", "fsdp", "tensor")}
    except (TypeError, ValueError, AttributeError) as err:
        raise PlanInputError(f"config.mesh: expected integer data/fsdp/tensor ({err})") from None
    free = [a for a, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise PlanInputError(f"config.mesh: at most one axis may be -1, got {sizes}")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise PlanInputError(f"config.mesh: axis sizes must be ≥ 1 or -1, got {sizes}")
    fixed = 1
    for v in sizes.values():
        if v != -1:
            fixed *= v
    if free:
        if n % fixed:
            raise PlanInputError(f"config.mesh: {n} devices are not divisible by {fixed} ({sizes})")
        sizes[free[0]] = n // fixed
    if sizes["data"] * sizes["fsdp"] * sizes["tensor"] > n:
        raise PlanInputError(f"config.mesh: {sizes} needs more than the {n} devices")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def model_path_for(
    role: str, *, hf_path: str = "", config_name: str = "", override: str = ""
) -> str:
    """The ``config.json`` of ``role``'s shape: ``override`` (``--<role>_model``), else
    ``hf_path`` (``<role>.hf_path``), else the family's default file under ``configs/models/``
    (family = the prefix of ``config_name``, the config's ``name``). The file must exist and
    hold a JSON object."""
    path = override or hf_path
    where = f"--{role}_model" if override else f"config.{role}.hf_path"
    if not path:
        family = str(config_name).split("_")[0]
        if family not in FAMILY_MODELS:
            raise PlanInputError(
                f"config.{role}.hf_path is empty and config {config_name!r} names no family with "
                f"a default shape ({', '.join(sorted(FAMILY_MODELS))}); pass --{role}_model=DIR "
                f"(a directory or config.json of the {role}'s model)"
            )
        path = os.path.join(_REPO, "configs", "models", FAMILY_MODELS[family])
        where = f"configs/models/{FAMILY_MODELS[family]}"
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise PlanInputError(
            f"{where}={path}: no config.json there; expected a model directory or its config.json"
        )
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise PlanInputError(f"{file}: not a readable JSON config ({type(err).__name__})") from None
    if not isinstance(d, dict):
        raise PlanInputError(f"{file}: expected a JSON object (a model's config.json)")
    return file
