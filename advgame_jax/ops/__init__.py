"""Fused numerical kernels for training: memory-lean per-token log-probs and entropies."""

from advgame_jax.ops.logprobs import (
    naive_token_logprobs,
    naive_token_logprobs_and_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)

__all__ = [
    "token_logprobs",
    "token_logprobs_and_entropy",
    "naive_token_logprobs",
    "naive_token_logprobs_and_entropy",
]
