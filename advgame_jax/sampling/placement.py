"""Where each player's sampler runs: the colocated memory plan and the engine settings derived
from the typed settings (docs/sampling.md explains how to choose).

Placements (``<role>.placement`` of the typed :class:`advgame_jax.settings.Settings`; a config
that still carries the older ``sampler`` field is translated by the converter, as
:func:`advgame_jax.settings.resolve_placement` says). The fields and the colocated memory plan
are checked when the config is converted (``advgame_jax.experiment.validate``):

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

from advgame_jax.settings import ConfigError, Settings

PLACEMENTS = ("jax", "colocated", "offloaded")
ROLES = ("attacker", "defender")


def placement_of(settings: Settings, role: str) -> str:
    """The placement of ``role``'s sampler (the converter already translated an older
    ``sampler`` field into it)."""
    return settings.player(role).placement


def completion_budget(settings: Settings, role: str) -> int:
    """``<role>.max_new_tokens``, or the shared ``sampling.max_new_tokens`` when it is 0."""
    return int(settings.max_new_tokens(role))


def max_model_len(settings: Settings, role: str, model_max_positions: int) -> int:
    """Prompt budget + completion budget (or the explicit ``vllm_max_model_len``); with no
    prompt budget (``engine.max_prompt_tokens=0``) the model's whole context."""
    player = settings.player(role)
    if player.vllm_max_model_len:
        return int(player.vllm_max_model_len)
    if not player.engine.max_prompt_tokens:
        return int(model_max_positions)
    return int(player.engine.max_prompt_tokens) + completion_budget(settings, role)


def apply_memory_plan(settings: Settings) -> None:
    """Set JAX's device-memory fraction for a colocated plan (before JAX initialises)."""
    if not any(settings.player(r).placement == "colocated" for r in ROLES):
        return
    frac = f"{float(settings.placement.jax_memory_fraction):.3f}"
    from jax._src import xla_bridge

    current = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if xla_bridge.backends_are_initialized():
        if current != frac and xla_bridge.get_backend().platform == "gpu":
            raise ConfigError(
                f"config.placement.jax_memory_fraction={frac}: JAX was initialised before the "
                f"memory plan could be applied (XLA_PYTHON_CLIENT_MEM_FRACTION={current}); set "
                f"it in the environment or build the runner before touching JAX devices"
            )
        return
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = frac
