"""Memory-lean per-token log-probs and entropies straight from final hidden states.

Owns the language-model head of the losses: given final-normed hidden states ``[N, d]``, the
unembedding ``[d, V]`` and target ids ``[N]``, compute ``log softmax(h @ W)[target]`` (and the
softmax entropy) WITHOUT ever holding the ``[N, V]`` logits. The work is cut into logit tiles
of ``chunk_size`` rows by ``VOCAB_CHUNK_SIZE`` vocabulary columns, and a ``jax.custom_vjp``
keeps only the inputs and O(N) row statistics (log-sum-exp, entropy) for the backward pass,
which recomputes the logits. Four matmuls per call for value and gradient (one forward, three
backward); benchmarks/README.md has the measured cost against that floor.

Numerics: logits are accumulated in fp32 (``preferred_element_type``), whatever the input
dtype; the backward matmuls take the logit cotangent in the inputs' dtype (bf16 stays bf16 on
the tensor cores) and accumulate in fp32. Gradients come back in the inputs' dtypes.

Padding and masking: ``N`` need not be a multiple of ``chunk_size`` (rows are zero-padded
internally and dropped again), nor ``V`` of the vocabulary block (a static tail block, never a
padded copy of the unembedding). Targets outside ``[0, V)`` are allowed (e.g. a pad id of
-100) and give the finite value ``-logsumexp``; masking such positions out of a loss is the
caller's business. Every row yields finite values and gradients for finite inputs.

The ``naive_*`` functions materialise the logits; they are the references for tests and
benchmarks, not for training.
"""

from __future__ import annotations

import functools
from typing import cast

import jax
import jax.numpy as jnp

# Vocabulary columns per tile: wide enough for efficient matmuls, narrow enough that tiles
# stay far below [N, V] (benchmarks/README.md has the measurements behind it).
VOCAB_CHUNK_SIZE = 8192

__all__ = [
    "VOCAB_CHUNK_SIZE",
    "tiled_token_logprobs_and_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "naive_token_logprobs",
    "naive_token_logprobs_and_entropy",
]


# ----------------------------------------------------------------------------- references


def _naive_logits(hidden, unembed):
    return jnp.dot(hidden, unembed, preferred_element_type=jnp.float32)


def naive_token_logprobs(hidden, unembed, targets):
    """Reference: ``log_softmax(hidden @ unembed)[targets]``; materialises ``[N, V]`` fp32.

    hidden ``[N, d]``, unembed ``[d, V]``, targets ``[N]`` int32 in ``[0, V)`` -> ``[N]`` fp32.
    """
    logp = jax.nn.log_softmax(_naive_logits(hidden, unembed), axis=-1)
    return jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]


def naive_token_logprobs_and_entropy(hidden, unembed, targets):
    """Reference: (``[N]`` target log-probs, ``[N]`` softmax entropies), both fp32."""
    logp = jax.nn.log_softmax(_naive_logits(hidden, unembed), axis=-1)
    lp = jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return lp, ent


# ----------------------------------------------------------------------------- tiled core
#
# Both passes loop over vocabulary blocks OUTSIDE and row chunks INSIDE:
#  - forward: each [chunk_size, Vb] tile is reduced in one pass to row statistics (max,
#    sum of exponentials, target logit, entropy term) merged into O(N) running statistics
#    (online log-sum-exp); each [d, Vb] block of the unembedding is sliced once.
#  - backward: for one vocabulary block, the row chunks recompute their logits and write the
#    logit cotangent d_z [N, Vb] (inputs' dtype); then d_unembed[:, block] = h^T d_z and
#    d_hidden += d_z W_block^T are two full-size matmuls. d_unembed is thus finished one block
#    at a time (no fp32 [d, V] accumulator: 2.2 GB for a 152k vocabulary at d = 3584) and
#    d_hidden accumulates in an fp32 [N, d] buffer. The block width is capped so that d_z
#    holds at most _BWD_BLOCK_ELEMS elements. Accumulating per row chunk instead (an fp32
#    [d, Vb] carry updated by every tile) measured 7% slower on an H200 at N = 16k.

_NEG = -1e30  # finite "minus infinity": keeps exp(m_old - m_new) and (m_old - m_new) * 0 finite


def _pad_rows(x, n_pad):
    if n_pad == 0:
        return x
    return jnp.pad(x, [(0, n_pad)] + [(0, 0)] * (x.ndim - 1))


def _split_rows(x, chunk, n_pad):
    """``[N, ...]`` -> ``[K, C, ...]`` with zero padding rows at the end."""
    x = _pad_rows(x, n_pad)
    return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


def _row_layout(n, chunk_size):
    """(rows per chunk, padding rows): as few chunks of at most ``chunk_size`` rows as fit,
    balanced, so padding stays under one row per chunk plus a multiple-of-8 round-up (1,152
    rows at 256 were 5 × 256 = 1,280, 11% of the head's work on zero rows; now 5 × 232)."""
    c = max(1, min(int(chunk_size), n))
    k = -(-n // c)
    c = -(-n // k)
    if k > 1 and -(-c // 8) * 8 <= chunk_size:
        c = -(-c // 8) * 8
    return c, k * c - n


def _over_vocab(unembed, block, body, carry, axis=1):
    """``carry = body(carry, w_block, col0)`` over the vocabulary blocks (``w_block`` is
    ``[d, Vb]``, or ``[Vb, d]`` when the vocabulary is ``axis`` 0): a scan over the full
    blocks plus one static tail block (no padded copy of the unembedding)."""
    v = unembed.shape[axis]
    block = min(block, v)
    full, tail = divmod(v, block)
    if full == 1 and tail == 0:
        return body(carry, unembed, 0)

    def step(carry, j):
        col0 = j * block
        w_blk = jax.lax.dynamic_slice_in_dim(unembed, col0, block, axis=axis)
        return body(carry, w_blk, col0), None

    carry, _ = jax.lax.scan(step, carry, jnp.arange(full, dtype=jnp.int32))
    if tail:
        carry = body(carry, jax.lax.slice_in_dim(unembed, full * block, v, axis=axis), full * block)
    return carry


def _logits(h, w_blk, axis):
    """``[C, d]`` hidden states × a vocabulary block → ``[C, Vb]`` fp32 logits."""
    return jax.lax.dot_general(
        h, w_blk, (((1,), (1 - axis,)), ((), ())), preferred_element_type=jnp.float32
    )


def _hits(shape, col0, t_c):
    # Iota comparison instead of a gather: any target id (in range or not) stays finite.
    return jax.lax.broadcasted_iota(jnp.int32, shape, 1) + col0 == t_c[:, None]


def _merge(a, b, with_entropy):
    """Combine softmax statistics (m, s, z_t, ez) of two disjoint sets of vocabulary columns.

    m: max logit; s = sum exp(z - m); z_t: target logit (0 where the target is elsewhere);
    ez = sum exp(z - m) (z - m), which gives the entropy as log s - ez / s. Exact in any
    order, and finite for the identity (_NEG, 0, 0, 0).
    """
    m_a, s_a, zt_a, ez_a = a
    m_b, s_b, zt_b, ez_b = b
    m = jnp.maximum(m_a, m_b)
    d_a, d_b = m_a - m, m_b - m
    e_a, e_b = jnp.exp(d_a), jnp.exp(d_b)
    s = e_a * s_a + e_b * s_b
    if with_entropy:
        ez = e_a * (ez_a + d_a * s_a) + e_b * (ez_b + d_b * s_b)
    else:
        ez = ez_a
    return m, s, zt_a + zt_b, ez


def _row_stats(z, z_t, with_entropy):
    """Row statistics of a ``[C, Vb]`` logit tile in ONE pass over it (a variadic reduction
    with :func:`_merge` as its combiner), instead of a max pass then an exp-sum pass. (On CPU
    this reduce runs as scalar code and costs about a third of the tile's matmul; two plain
    max / sum passes measured 1.5x faster for the head's forward, but their fusion differs
    between the policy's and the reference's pass, so log-probs of equal params stopped being
    bitwise equal, which the update's metrics at θ = θ̄ rely on.)"""
    f32 = jnp.float32
    operands = (z, jnp.ones_like(z), z_t, jnp.zeros_like(z))
    init = (f32(_NEG), f32(0.0), f32(0.0), f32(0.0))
    return jax.lax.reduce(operands, init, lambda a, b: _merge(a, b, with_entropy), (1,))


def _forward(hidden, unembed, targets, chunk_size, vocab_chunk_size, with_entropy, axis):
    """(log-probs, logsumexp, entropies) ``[N]`` fp32 via online softmax statistics."""
    n = hidden.shape[0]
    c, n_pad = _row_layout(n, chunk_size)
    h = _split_rows(hidden, c, n_pad)
    t = _split_rows(targets.astype(jnp.int32), c, n_pad)
    k = t.shape[0]
    zeros = jnp.zeros((k, c), jnp.float32)
    # Running per-row max m, sum s = sum exp(z - m), target logit, and sum exp(z - m)(z - m).
    stats0 = (jnp.full((k, c), _NEG, jnp.float32), zeros, zeros, zeros)

    def block(stats, w_blk, col0):
        def tile(xs):
            h_c, t_c = xs[:2]
            z = _logits(h_c, w_blk, axis)  # [C, Vb]
            z_t = jnp.where(_hits(z.shape, col0, t_c), z, 0.0)
            return _merge(xs[2:], _row_stats(z, z_t, with_entropy), with_entropy)

        return jax.lax.map(tile, (h, t) + tuple(stats))

    m, s, z_t, ez = _over_vocab(unembed, vocab_chunk_size, block, stats0, axis)
    log_s = jnp.log(s)
    lse = m + log_s
    ent = log_s - ez / s if with_entropy else zeros
    unpad = lambda x: x.reshape(-1)[:n]  # noqa: E731
    return unpad(z_t - lse), unpad(lse), unpad(ent)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _tiled(hidden, unembed, targets, chunk_size, vocab_chunk_size, with_entropy, axis):
    lp, _, ent = _forward(
        hidden, unembed, targets, chunk_size, vocab_chunk_size, with_entropy, axis
    )
    return lp, ent


def _tiled_fwd(hidden, unembed, targets, chunk_size, vocab_chunk_size, with_entropy, axis):
    lp, lse, ent = _forward(
        hidden, unembed, targets, chunk_size, vocab_chunk_size, with_entropy, axis
    )
    return (lp, ent), (hidden, unembed, targets, lse, ent)


def _logit_cotangent(xs, w_blk, col0, with_entropy, cdt, axis):
    """d loss / d z for one ``[C, Vb]`` tile, recomputing its logits; in ``cdt``."""
    h_c, t_c, g_c, lse_c = xs[:4]
    z = _logits(h_c, w_blk, axis)
    logp = z - lse_c[:, None]
    p = jnp.exp(logp)
    # d lp / dz = onehot - p;  d H / dz = -p (log p + H).
    d_z = jnp.where(_hits(z.shape, col0, t_c), g_c[:, None], 0.0) - g_c[:, None] * p
    if with_entropy:
        ge_c, ent_c = xs[4:]
        d_z = d_z - ge_c[:, None] * p * (logp + ent_c[:, None])
    # Feed the tensor cores in the inputs' dtype; the matmuls accumulate in fp32.
    return d_z.astype(cdt)


# Elements of the backward pass's [N, Vb] logit cotangent (256 MiB in bf16). Measured on an
# H200 at N = 16k: 2^27 was 3% faster than 2^26 for 0.15 GiB more temporary memory.
_BWD_BLOCK_ELEMS = 1 << 27


def _bwd_vocab_block(n_rows, vocab_chunk_size):
    """Backward vocabulary block: VOCAB_CHUNK_SIZE, narrower (>= 512) when N is large."""
    fit = max(512, (_BWD_BLOCK_ELEMS // max(n_rows, 1)) // 512 * 512)
    return min(int(vocab_chunk_size), fit)


def _tiled_bwd(chunk_size, vocab_chunk_size, with_entropy, axis, res, cts):
    hidden, unembed, targets, lse, ent = res
    g_lp, g_ent = cts
    n, d = hidden.shape
    cdt = jnp.result_type(hidden.dtype, unembed.dtype)
    c, n_pad = _row_layout(n, chunk_size)
    # Padding rows get zero cotangents, so they add nothing to d_unembed.
    rows = lambda x: _split_rows(x.astype(jnp.float32), c, n_pad)  # noqa: E731
    h = _split_rows(hidden.astype(cdt), c, n_pad)
    t = _split_rows(targets.astype(jnp.int32), c, n_pad)
    k = t.shape[0]
    xs_rows = (h, t, rows(g_lp), rows(lse))
    if with_entropy:
        xs_rows += (rows(g_ent), rows(ent))

    # hᵀ [d, N] once, materialised (the barrier keeps XLA from folding the transpose into
    # the dots): every block's d_unembed is then a plain row-major matmul; XLA:CPU otherwise
    # copies a transposed [N, Vb] logit cotangent per block.
    h_t = jax.lax.optimization_barrier(h.reshape(k * c, d).T)
    f32 = jnp.float32

    def block(carry, w_blk, col0):
        d_h, d_w = carry
        w_blk = w_blk.astype(cdt)
        d_z = jax.lax.map(
            lambda xs: _logit_cotangent(xs, w_blk, col0, with_entropy, cdt, axis), xs_rows
        ).reshape(k * c, w_blk.shape[axis])
        dims = (((1,), (axis,)), ((), ()))  # d_z · w_blkᵀ (contract the vocabulary)
        d_h = d_h + jax.lax.dot_general(d_z, w_blk, dims, preferred_element_type=f32)
        d_w_blk = jnp.dot(h_t, d_z, preferred_element_type=f32)  # [d, Vb]
        if axis == 0:
            d_w_blk = d_w_blk.T
        d_w = jax.lax.dynamic_update_slice_in_dim(d_w, d_w_blk.astype(d_w.dtype), col0, axis)
        return d_h, d_w

    carry0 = (jnp.zeros((k * c, d), jnp.float32), jnp.zeros(unembed.shape, unembed.dtype))
    vb = _bwd_vocab_block(k * c, vocab_chunk_size)
    d_h, d_w = _over_vocab(unembed, vb, block, carry0, axis)
    return d_h[:n].astype(hidden.dtype), d_w, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def _check(hidden, unembed, targets, vocab_major=False):
    layout = "[V, d]" if vocab_major else "[d, V]"
    if hidden.ndim != 2 or unembed.ndim != 2 or targets.ndim != 1:
        raise ValueError(
            f"expected hidden [N, d], unembed {layout}, targets [N]; got shapes "
            f"{hidden.shape}, {unembed.shape}, {targets.shape}"
        )
    d_axis = 1 if vocab_major else 0
    if hidden.shape[1] != unembed.shape[d_axis] or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"shape mismatch: hidden {hidden.shape}, unembed {unembed.shape}, "
            f"targets {targets.shape}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")


def _check_sizes(chunk_size, vocab_chunk_size):
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def tiled_token_logprobs_and_entropy(
    hidden,
    unembed,
    targets,
    *,
    chunk_size=1024,
    vocab_chunk_size=VOCAB_CHUNK_SIZE,
    with_entropy=True,
    vocab_major=False,
) -> tuple[jax.Array, jax.Array]:
    """The tiled kernel with both tile sizes exposed (for tuning and benchmarks).

    hidden ``[N, d]``, unembed ``[d, V]`` (``[V, d]`` with ``vocab_major``: a tied input
    embedding as it is stored, sliced by rows, never transposed), targets ``[N]`` int ->
    (``[N]`` log-probs fp32, ``[N]`` entropies fp32, zeros when ``with_entropy`` is False).
    Tiles are ``[chunk_size, vocab_chunk_size]``; a ``vocab_chunk_size >= V`` means row
    chunks only.
    """
    _check(hidden, unembed, targets, vocab_major)
    _check_sizes(chunk_size, vocab_chunk_size)
    axis = 0 if vocab_major else 1
    out = _tiled(
        hidden, unembed, targets, int(chunk_size), int(vocab_chunk_size), bool(with_entropy), axis
    )
    # functools.partial(jax.custom_vjp, ...) hides the wrapped function's return type.
    return cast(tuple[jax.Array, jax.Array], out)


def token_logprobs(hidden, unembed, targets, *, chunk_size=1024, vocab_major=False):
    """Per-token target log-probs without materialising the ``[N, V]`` logits.

    hidden ``[N, d]`` (fp32 or bf16), unembed ``[d, V]``, targets ``[N]`` int -> ``[N]`` fp32.
    Differentiable in ``hidden`` and ``unembed`` (custom VJP; residuals: the inputs and the
    ``[N]`` log-sum-exp). Extra memory: a few ``[chunk_size, VOCAB_CHUNK_SIZE]`` fp32 tiles;
    the backward pass adds an ``[N, Vb]`` logit cotangent in the inputs' dtype (Vb <=
    VOCAB_CHUNK_SIZE, narrower for large N), an fp32 ``[N, d]`` accumulator and an fp32
    ``[d, Vb]`` block of d_unembed. On GPUs a ``chunk_size`` of 4096 is faster than 1024.
    ``vocab_major``: ``unembed`` is ``[V, d]`` (a tied embedding table).
    """
    return tiled_token_logprobs_and_entropy(
        hidden,
        unembed,
        targets,
        chunk_size=chunk_size,
        with_entropy=False,
        vocab_major=vocab_major,
    )[0]


def token_logprobs_and_entropy(hidden, unembed, targets, *, chunk_size=1024, vocab_major=False):
    """(``[N]`` target log-probs, ``[N]`` softmax entropies), fp32, tiled like
    :func:`token_logprobs`; both outputs are differentiable (the residuals add the ``[N]``
    entropies)."""
    return tiled_token_logprobs_and_entropy(
        hidden,
        unembed,
        targets,
        chunk_size=chunk_size,
        with_entropy=True,
        vocab_major=vocab_major,
    )
