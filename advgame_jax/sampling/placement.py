"""Where each player's sampler runs, as config: validation, the colocated memory plan, and
the engine settings derived from the config (docs/sampling.md explains how to choose).

Placements (``config.<role>.placement``; ``""`` keeps the older ``sampler`` field's meaning:
``'jax'`` → ``'jax'``, ``'vllm'`` → ``'colocated'``). A placement that is set decides alone:
``placement='jax'`` runs the JAX sampler whatever ``sampler`` says, so one override moves a
vLLM config onto a CPU:

* ``jax``: the JAX-native KV-cache sampler inside the trainer, on the trainer's mesh.
* ``colocated``: a vLLM engine inside the trainer process, on the trainer's devices. Both
  frameworks preallocate device memory, so the plan must be explicit: JAX's share
  (``config.placement.jax_memory_fraction``, applied as ``XLA_PYTHON_CLIENT_MEM_FRACTION``
  before JAX initialises) plus every colocated engine's ``engine.gpu_memory_utilization``
  plus a margin must fit in one device; otherwise ``ConfigError`` with the numbers, before
  any model loads.
* ``offloaded``: a vLLM engine in its own process on devices the trainer does not use
  (``engine.devices``), started and supervised by the trainer, or a user-started engine at
  ``engine.address`` (vLLM's own OpenAI server). See ``engines``.

Every vLLM engine's ``max_model_len`` is the prompt budget plus the player's completion budget
(``engine.max_prompt_tokens + <role>.max_new_tokens``, or ``sampling.max_new_tokens``) unless ``vllm_max_model_len`` sets
it, or the model's whole context when no prompt budget is set; there is no hidden cap.
"""

from __future__ import annotations

import os

from advgame_jax.experiment.validate import ConfigError

PLACEMENTS = ("jax", "colocated", "offloaded")
ROLES = ("attacker", "defender")


def placement_of(config, role: str) -> str:
    """The effective placement of ``role``'s sampler."""
    pc = config[role]
    p = pc.get("placement", "") or ""
    if not p:
        return "jax" if pc.sampler == "jax" else "colocated"
    return p


def max_model_len(config, role: str, model_max_positions: int) -> int:
    """Prompt budget + completion budget (or the explicit ``vllm_max_model_len``); with no
    prompt budget (``engine.max_prompt_tokens=0``) the model's whole context."""
    pc = config[role]
    if pc.vllm_max_model_len:
        return int(pc.vllm_max_model_len)
    if not pc.engine.max_prompt_tokens:
        return int(model_max_positions)
    from advgame_jax.game.config import player_max_new_tokens

    return int(pc.engine.max_prompt_tokens) + player_max_new_tokens(config, role)


def _number(value, field: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"config.{field}: expected a number in [{low}, {high}], got {value!r}")
    return float(value)


def validate_placement(config) -> None:
    """Check placement fields and the colocated memory plan; ``ConfigError`` naming the field."""
    colocated = {}
    for role in ROLES:
        pc = config[role]
        if "engine" not in pc:
            return  # a config from before placements existed: nothing to check
        p = pc.get("placement", "") or ""
        if p and p not in PLACEMENTS:
            raise ConfigError(f"config.{role}.placement: expected one of {PLACEMENTS} or '', "
                              f"got {p!r}")
        p = placement_of(config, role)
        e = pc.engine
        for f, low in (("tensor_parallel_size", 1), ("max_prompt_tokens", 0),
                       ("keep_sync_checkpoints", 1)):
            v = e[f]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"config.{role}.engine.{f}: expected an integer >= {low}, "
                                  f"got {v!r}")
        _number(e.gpu_memory_utilization, f"{role}.engine.gpu_memory_utilization", 0.0, 1.0)
        for f in ("startup_timeout_s", "request_timeout_s"):
            v = e[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"config.{role}.engine.{f}: expected seconds > 0, got {v!r}")
        if e.address and p != "offloaded":
            raise ConfigError(f"config.{role}.engine.address is set but placement is {p!r}; "
                              f"a user-started engine needs placement='offloaded'")
        if e.address and (":" not in e.address or not e.address.rpartition(":")[2].isdigit()):
            raise ConfigError(f"config.{role}.engine.address: expected 'host:port', "
                              f"got {e.address!r}")
        if p == "colocated":
            explicit = bool(pc.get("placement"))
            if not explicit and e.gpu_memory_utilization <= 0:
                continue  # legacy sampler='vllm' without a plan: vLLM's defaults, unchecked
            if e.gpu_memory_utilization <= 0:
                raise ConfigError(
                    f"config.{role}.engine.gpu_memory_utilization: a colocated engine needs an "
                    f"explicit share of each device (e.g. 0.3), got {e.gpu_memory_utilization}")
            colocated[role] = float(e.gpu_memory_utilization)
    if not colocated:
        return
    pl = config.placement
    jax_frac = _number(pl.jax_memory_fraction, "placement.jax_memory_fraction", 0.0, 1.0)
    margin = _number(pl.device_memory_margin, "placement.device_memory_margin", 0.0, 0.5)
    if jax_frac <= 0:
        raise ConfigError(
            "config.placement.jax_memory_fraction: colocated engines "
            f"({', '.join(colocated)}) share the trainer's devices, so JAX's share must be "
            "explicit (JAX preallocates 0.75 of each device by default), e.g. 0.5")
    total = jax_frac + sum(colocated.values()) + margin
    if total > 1.0 + 1e-9:
        parts = " + ".join([f"JAX {jax_frac:.2f}"]
                           + [f"{r} engine {u:.2f}" for r, u in colocated.items()]
                           + [f"margin {margin:.2f}"])
        raise ConfigError(
            f"config.placement: colocated memory plan over-subscribes each device: {parts} = "
            f"{total:.2f} > 1.00 of device memory. Lower placement.jax_memory_fraction or "
            f"<role>.engine.gpu_memory_utilization, or use placement='offloaded'")


def apply_memory_plan(config) -> None:
    """Set JAX's device-memory fraction for a colocated plan (before JAX initialises)."""
    if not any(placement_of(config, r) == "colocated" for r in ROLES if "engine" in config[r]):
        return
    frac = f"{float(config.placement.jax_memory_fraction):.3f}"
    from jax._src import xla_bridge

    current = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if xla_bridge.backends_are_initialized():
        if current != frac and xla_bridge.get_backend().platform == "gpu":
            raise ConfigError(
                f"config.placement.jax_memory_fraction={frac}: JAX was initialised before the "
                f"memory plan could be applied (XLA_PYTHON_CLIENT_MEM_FRACTION={current}); set "
                f"it in the environment or build the runner before touching JAX devices")
        return
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = frac
