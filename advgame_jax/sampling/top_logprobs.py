"""The most likely alternatives at each generated token (the server's ``top_logprobs``).

The sampler returns the log-prob of each sampled token only; the alternatives come from one
teacher-forced forward pass of the same model over prompt + completion, taking the top ``k``
of the model's log-softmax (before temperature / top-p / top-k, like ``Completion.logprobs``)
at every completion position. Rows are left-padded to power-of-two lengths and batched in
power-of-two buckets, so a server compiles a handful of programs.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from advgame_jax.models.transformer import forward_hidden, logits_from_hidden
from advgame_jax.sampling.jax_sampler import next_pow2


@functools.partial(jax.jit, static_argnames=("config", "k", "tail", "compute_dtype"))
def _top_k(params, tokens, mask, *, config, k, tail, compute_dtype):
    hidden = forward_hidden(params, config, tokens, mask, compute_dtype=compute_dtype)
    # Position t predicts token t + 1: the last ``tail`` completion tokens are predicted by
    # the hidden states just before them.
    logits = logits_from_hidden(params, config, hidden[:, -tail - 1 : -1])
    return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)


def top_logprobs(sampler, rows, k: int, *, chunk: int = 16):
    """``rows``: ``(prompt ids, completion ids)`` pairs; returns, per row, per completion
    token, ``k`` ``(token id, log-prob)`` pairs, most likely first. ``sampler``: a
    ``JaxSampler`` (its params, config and compute dtype are used)."""
    out = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        tail = next_pow2(max(len(c) for _, c in part), 4)
        length = next_pow2(max(len(p) + tail for p, _ in part), 16)
        b = next_pow2(len(part))
        tokens = np.zeros((b, length), np.int32)
        mask = np.zeros((b, length), bool)
        for r in range(b):
            p, c = part[min(r, len(part) - 1)]
            seq = list(p) + list(c) + [0] * (tail - len(c))  # pad so the tail is aligned
            tokens[r, length - len(seq) :] = seq
            mask[r, length - len(seq) :] = True
        vals, ids = _top_k(
            sampler.params,
            tokens,
            mask,
            config=sampler.config,
            k=int(k),
            tail=tail,
            compute_dtype=sampler.compute_dtype.name,
        )
        vals, ids = np.asarray(vals), np.asarray(ids)
        for r, (_, c) in enumerate(part):
            out.append(
                [
                    [(int(i), float(v)) for i, v in zip(ids[r, j], vals[r, j], strict=True)]
                    for j in range(len(c))
                ]
            )
    return out
