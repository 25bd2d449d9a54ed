"""Causal self-attention of the training forward pass, with a selectable implementation.

All implementations compute the same function: query i of row b attends to keys j ≤ i with
``kv_mask[b, j]`` (grouped-query heads; softmax in fp32; output in q's dtype).

* ``'xla'``: one einsum pair over the full ``[B, K, G, T, S]`` fp32 score tensor (the
  reference; small shapes only).
* ``'chunked'``: exact, memory-lean fallback for every platform. Queries are cut into chunks
  whose fp32 scores hold at most ``SCORE_BUDGET`` elements; each chunk is a ``jax.checkpoint``
  body of a ``lax.map``, so neither the forward nor the backward pass ever holds the whole
  ``[B, H, T, S]`` scores (the backward recomputes one chunk's scores at a time).
* ``'cudnn'``: ``jax.nn.dot_product_attention(implementation='cudnn')`` (fused flash attention on
  NVIDIA GPUs), with ``is_causal`` and per-row key lengths. It needs each row's real tokens to
  be a prefix (right padding), which ``training.batching`` guarantees.
* ``'auto'``: ``'cudnn'`` on GPU for 16-bit activations, ``'chunked'`` otherwise. (A Pallas
  splash-attention kernel for TPU is not wired in yet: TPUs use ``'chunked'``.)

Shapes: q ``[B, T, H, hd]``, k/v ``[B, S, K, hd]`` with S == T, kv_mask ``[B, S]`` bool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn")

# fp32 score elements per query chunk of the chunked implementation (256 MiB).
SCORE_BUDGET = 1 << 26

_NEG = jnp.finfo(jnp.float32).min


def resolve_impl(impl: str, dtype=jnp.bfloat16) -> str:
    """``impl`` with 'auto' replaced by the platform's choice for activations of ``dtype``
    (cuDNN's fused kernel takes 16-bit inputs only); raises on an unknown name."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        fused = jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2
        return "cudnn" if fused else "chunked"
    return impl


def _scores_softmax_out(q, k, v, mask):
    """q ``[B, Tq, K, G, hd]``, k/v ``[B, S, K, hd]``, mask ``[B, Tq, S]`` → ``[B, Tq, K, G, hd]``."""
    hd = q.shape[-1]
    scores = jnp.einsum(
        "btkgh,bskh->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32
    ) * (hd**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(q.dtype))


def _causal_mask(kv_mask, q0, tq):
    s = kv_mask.shape[1]
    qi = q0 + jax.lax.broadcasted_iota(jnp.int32, (tq, s), 0)
    kj = jax.lax.broadcasted_iota(jnp.int32, (tq, s), 1)
    return (kj <= qi)[None] & kv_mask[:, None, :]


def query_chunk(b: int, n_heads: int, s: int, t: int, budget: int = SCORE_BUDGET) -> int:
    """Largest divisor of ``t`` whose fp32 scores ``[b, n_heads, chunk, s]`` fit ``budget``."""
    limit = max(1, budget // max(1, b * n_heads * s))
    best = 1
    for c in range(1, t + 1):
        if t % c == 0 and c <= limit:
            best = c
    return best


def causal_attention(q, k, v, kv_mask, *, impl: str = "xla", budget: int = SCORE_BUDGET):
    """Causal GQA attention ``[B, T, H, hd]`` (see module docstring for ``impl``)."""
    impl = resolve_impl(impl, q.dtype)
    b, t, n_q, hd = q.shape
    n_kv = k.shape[2]
    kv_mask = kv_mask.astype(jnp.bool_)
    if impl == "cudnn":
        lengths = jnp.sum(kv_mask.astype(jnp.int32), axis=-1)
        return jax.nn.dot_product_attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            is_causal=True,
            query_seq_lengths=None,
            key_value_seq_lengths=lengths,
            implementation="cudnn",
        )
    qg = q.reshape(b, t, n_kv, n_q // n_kv, hd)
    if impl == "xla":
        return _scores_softmax_out(qg, k, v, _causal_mask(kv_mask, 0, t)).reshape(b, t, n_q, hd)
    c = query_chunk(b, n_q, k.shape[1], t, budget)
    if c == t:
        return _scores_softmax_out(qg, k, v, _causal_mask(kv_mask, 0, t)).reshape(b, t, n_q, hd)
    n = t // c
    q_chunks = jnp.moveaxis(qg.reshape(b, n, c, n_kv, n_q // n_kv, hd), 1, 0)

    @jax.checkpoint
    def one(args):
        q_c, i = args
        return _scores_softmax_out(q_c, k, v, _causal_mask(kv_mask, i * c, c))

    out = jax.lax.map(one, (q_chunks, jnp.arange(n, dtype=jnp.int32)))  # [n, B, c, K, G, hd]
    return jnp.moveaxis(out, 0, 1).reshape(b, t, n_q, hd)
