"""The Sampler protocol: the one interface through which the game generates text.

Every backend (the JAX-native KV-cache sampler, the vLLM sampler, test stubs) implements
``generate`` and ``update_weights``. The game only ever sees this module's types.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Protocol, Sequence, runtime_checkable

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


@runtime_checkable
class Sampler(Protocol):
    """What the game needs from a generation backend."""

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        """Generate ``params.n`` completions per prompt.

        Returns a flat list of ``len(prompt_token_ids) * params.n`` completions, grouped by
        prompt: prompt ``i``'s samples are at ``[i * n, (i + 1) * n)``.
        """
        ...

    def update_weights(self, params: Any = None, *, checkpoint_path: Optional[str] = None) -> None:
        """Swap in new weights: a params pytree in memory, or an Orbax checkpoint path."""
        ...
