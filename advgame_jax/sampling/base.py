"""The Sampler contract: the one interface through which the game generates text.

Every placement implements it the same way: the JAX-native KV-cache sampler
(``jax_sampler.JaxSampler``, in the trainer), the vLLM engine in the trainer process
(``vllm_sampler.VllmSampler``), the offloaded vLLM server (``engines.RemoteSampler``) and the
trainer's version check around any of them (``experiment.players.VersionedSampler``):

* ``generate(prompts, params)``: ``params.n`` completions per prompt, grouped by prompt, each
  stamped with the weights version that produced it (``Completion.weights_version``).
* ``load_weights(ref) -> version``: swap in new weights without restarting or recompiling.
  Each placement has exactly one weight path: the JAX sampler takes ``InMemoryWeights`` (a
  param pytree), the vLLM samplers a committed ``SyncCheckpoint`` (``weight_sync``) that every
  engine worker reads itself. Any other reference raises ``TypeError``.
* ``prompt_budget``: the longest prompt, in tokens, the sampler accepts. A longer prompt (or,
  on a vLLM engine, one whose prompt + ``max_new_tokens`` exceeds the engine's context) is
  answered with ``params.n`` empty completions with finish reason ``"length"`` (the game's
  MAX_LENGTH error for its slot, GAME_SPEC §1) and counted in ``stats()["prompt_too_long"]``;
  it never fails the batch.
* ``stats()``: counters, at least ``STAT_KEYS``.
* ``close()``: release the engine (a no-op for in-process JAX programs).

Game code that only generates (rollouts, judges) needs ``generate`` alone (``Generator``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Protocol, Sequence, Union, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding controls for one ``generate`` call.

    temperature 0 means greedy. ``top_k`` 0 disables top-k; ``top_p`` 1.0 disables nucleus
    filtering. ``n`` completions are drawn per prompt. ``seed`` makes the call reproducible:
    the same prompts, params and weights give the same completions.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated completion.

    ``token_ids`` excludes the prompt and includes the stop token when one ended the
    completion. ``logprobs[i]`` is the sampler's log-prob of ``token_ids[i]`` under the
    distribution it sampled from *before* temperature / top-p / top-k (the model's
    log-softmax), as used for importance sampling. ``finish_reason`` is ``"stop"`` when a
    stop token ended it and ``"length"`` when ``max_new_tokens`` did. ``weights_version`` is
    the version of the weights that generated it (the trainer step of the last sync), when the
    sampler tracks one.
    """

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    finish_reason: FinishReason
    weights_version: Optional[int] = None


def over_budget_completions(n: int, version: Optional[int]) -> list[Completion]:
    """What every sampler answers for a prompt over its budget: ``n`` completions with no
    tokens and finish reason "length" (the game's MAX_LENGTH), stamped with ``version``."""
    return [
        Completion(
            token_ids=(), text="", logprobs=(), finish_reason="length", weights_version=version
        )
        for _ in range(n)
    ]


@dataclasses.dataclass(frozen=True)
class InMemoryWeights:
    """New weights as a param pytree in this process (the JAX sampler's weight path).

    ``version``: the label the sampler stamps on completions from then on (the trainer
    step). ``copy``: the sampler keeps its own copy (default), so the caller may donate or
    delete its arrays afterwards; False hands the buffers over.
    """

    params: Any
    version: int
    copy: bool = True


@dataclasses.dataclass(frozen=True)
class SyncCheckpoint:
    """A committed sync checkpoint directory (``weight_sync.write_sync_checkpoint``), the
    vLLM samplers' weight path. ``version``: the version the caller expects (default: the
    one the checkpoint commits); a mismatch raises."""

    path: str
    version: Optional[int] = None


WeightsRef = Union[InMemoryWeights, SyncCheckpoint]

STAT_KEYS = ("prompt_too_long", "weights_version", "loads")


@dataclasses.dataclass
class SamplerCounters:
    """The counters every sampler keeps and reports through ``stats()``.

    ``prompt_too_long``: prompts answered with the over-budget completions;
    ``weights_version``: the version of the weights loaded last (None: the weights the sampler
    was built with, never loaded); ``loads``: successful ``load_weights`` calls.
    """

    prompt_too_long: int = 0
    weights_version: Optional[int] = None
    loads: int = 0

    def loaded(self, version: int) -> int:
        self.weights_version, self.loads = int(version), self.loads + 1
        return self.weights_version

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_too_long": self.prompt_too_long,
            "weights_version": self.weights_version,
            "loads": self.loads,
        }


def wrong_ref(sampler: object, ref: object, accepted: type) -> TypeError:
    """The error for a weights reference the placement does not take."""
    return TypeError(
        f"{type(sampler).__name__}.load_weights: got {type(ref).__name__}; this placement "
        f"loads weights only from {accepted.__name__}"
    )


@runtime_checkable
class Generator(Protocol):
    """What rollouts and judges need: ``generate`` alone."""

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]: ...


@runtime_checkable
class Sampler(Protocol):
    """The contract every placement implements (module docstring)."""

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        """Generate ``params.n`` completions per prompt.

        Returns a flat list of ``len(prompt_token_ids) * params.n`` completions, grouped by
        prompt: prompt ``i``'s samples are at ``[i * n, (i + 1) * n)``.
        """
        ...

    @property
    def prompt_budget(self) -> int:
        """The longest prompt (in tokens) this sampler accepts (module docstring)."""
        ...

    def load_weights(self, ref: WeightsRef) -> int:
        """Swap in the weights ``ref`` names; returns the version now loaded, which every
        later completion carries. Raises ``TypeError`` for a reference kind the placement
        does not take, and leaves the old weights in place on any failure."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters: at least ``STAT_KEYS`` (``SamplerCounters``)."""
        ...

    def close(self) -> None:
        """Release the engine, if any (idempotent)."""
        ...
