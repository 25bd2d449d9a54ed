"""Samplers: the ``Sampler`` contract (``base``), the JAX KV-cache sampler, the vLLM sampler (optional
extra, imported lazily) and an OpenAI-compatible HTTP server over a sampler."""

from typing import TYPE_CHECKING

from advgame_jax.sampling.base import (
    Completion,
    FinishReason,
    Generator,
    InMemoryWeights,
    Sampler,
    SamplingParams,
    SyncCheckpoint,
    WeightsRef,
)

if TYPE_CHECKING:  # at run time these load lazily, through __getattr__ below
    from advgame_jax.sampling.checkpoints import restore_params
    from advgame_jax.sampling.jax_sampler import JaxSampler
    from advgame_jax.sampling.vllm_sampler import VllmSampler

__all__ = [
    "Completion",
    "FinishReason",
    "Generator",
    "InMemoryWeights",
    "Sampler",
    "SamplingParams",
    "SyncCheckpoint",
    "WeightsRef",
    "JaxSampler",
    "VllmSampler",
    "restore_params",
]


def __getattr__(name):
    # Lazy: importing the package must not import JAX programs or vllm.
    if name == "JaxSampler":
        from advgame_jax.sampling.jax_sampler import JaxSampler

        return JaxSampler
    if name == "VllmSampler":
        from advgame_jax.sampling.vllm_sampler import VllmSampler

        return VllmSampler
    if name == "restore_params":
        from advgame_jax.sampling.checkpoints import restore_params

        return restore_params
    raise AttributeError(f"module 'advgame_jax.sampling' has no attribute {name!r}")
