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
    c = max(1, min(int(chunk_size), n))
    k = -(-n // c)
    return c, k * c - n


def _over_vocab(unembed, block, body, carry):
    """``carry = body(carry, w_block [d, Vb], col0)`` over the vocabulary blocks: a scan over
    the full blocks plus one static tail block (no padded copy of the unembedding)."""
    v = unembed.shape[1]
    block = min(block, v)
    full, tail = divmod(v, block)
    if full == 1 and tail == 0:
        return body(carry, unembed, 0)

    def step(carry, j):
        col0 = j * block
        w_blk = jax.lax.dynamic_slice_in_dim(unembed, col0, block, axis=1)
        return body(carry, w_blk, col0), None

    carry, _ = jax.lax.scan(step, carry, jnp.arange(full, dtype=jnp.int32))
    if tail:
        carry = body(carry, unembed[:, full * block :], full * block)
    return carry


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
    with :func:`_merge` as its combiner), instead of a max pass then an exp-sum pass."""
    f32 = jnp.float32
    operands = (z, jnp.ones_like(z), z_t, jnp.zeros_like(z))
    init = (f32(_NEG), f32(0.0), f32(0.0), f32(0.0))
    return jax.lax.reduce(operands, init, lambda a, b: _merge(a, b, with_entropy), (1,))


def _forward(hidden, unembed, targets, chunk_size, vocab_chunk_size, with_entropy):
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
            z = jnp.dot(h_c, w_blk, preferred_element_type=jnp.float32)  # [C, Vb]
            z_t = jnp.where(_hits(z.shape, col0, t_c), z, 0.0)
            return _merge(xs[2:], _row_stats(z, z_t, with_entropy), with_entropy)

        return jax.lax.map(tile, (h, t) + tuple(stats))

    m, s, z_t, ez = _over_vocab(unembed, vocab_chunk_size, block, stats0)
    log_s = jnp.log(s)
    lse = m + log_s
    ent = log_s - ez / s if with_entropy else zeros
    unpad = lambda x: x.reshape(-1)[:n]  # noqa: E731
    return unpad(z_t - lse), unpad(lse), unpad(ent)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _tiled(hidden, unembed, targets, chunk_size, vocab_chunk_size, with_entropy):
    lp, _, ent = _forward(hidden, unembed, targets, chunk_size, vocab_chunk_size, with_entropy)
    return lp, ent


def _tiled_fwd(hidden, unembed, targets, chunk_size, vocab_chunk_size, with_entropy):
    lp, lse, ent = _forward(hidden, unembed, targets, chunk_size, vocab_chunk_size, with_entropy)
    return (lp, ent), (hidden, unembed, targets, lse, ent)


def _logit_cotangent(xs, w_blk, col0, with_entropy, cdt):
    """d loss / d z for one ``[C, Vb]`` tile, recomputing its logits; in ``cdt``."""
    h_c, t_c, g_c, lse_c = xs[:4]
    z = jnp.dot(h_c, w_blk, preferred_element_type=jnp.float32)
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


def _tiled_bwd(chunk_size, vocab_chunk_size, with_entropy, res, cts):
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

    h_flat = h.reshape(k * c, d)

    def block(carry, w_blk, col0):
        d_h, d_w = carry
        w_blk = w_blk.astype(cdt)
        d_z = jax.lax.map(
            lambda xs: _logit_cotangent(xs, w_blk, col0, with_entropy, cdt), xs_rows
        ).reshape(k * c, w_blk.shape[1])
        d_h = d_h + jnp.dot(d_z, w_blk.T, preferred_element_type=jnp.float32)
        d_w_blk = jnp.dot(h_flat.T, d_z, preferred_element_type=jnp.float32)
        d_w = jax.lax.dynamic_update_slice_in_dim(d_w, d_w_blk.astype(d_w.dtype), col0, axis=1)
        return d_h, d_w

    carry0 = (jnp.zeros((k * c, d), jnp.float32), jnp.zeros(unembed.shape, unembed.dtype))
    d_h, d_w = _over_vocab(unembed, _bwd_vocab_block(k * c, vocab_chunk_size), block, carry0)
    return d_h[:n].astype(hidden.dtype), d_w, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def _check(hidden, unembed, targets):
    if hidden.ndim != 2 or unembed.ndim != 2 or targets.ndim != 1:
        raise ValueError(
            "expected hidden [N, d], unembed [d, V], targets [N]; got shapes "
            f"{hidden.shape}, {unembed.shape}, {targets.shape}"
        )
    if hidden.shape[1] != unembed.shape[0] or hidden.shape[0] != targets.shape[0]:
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
) -> tuple[jax.Array, jax.Array]:
    """The tiled kernel with both tile sizes exposed (for tuning and benchmarks).

    hidden ``[N, d]``, unembed ``[d, V]``, targets ``[N]`` int -> (``[N]`` log-probs fp32,
    ``[N]`` entropies fp32, zeros when ``with_entropy`` is False). Tiles are
    ``[chunk_size, vocab_chunk_size]``; a ``vocab_chunk_size >= V`` means row chunks only.
    """
    _check(hidden, unembed, targets)
    _check_sizes(chunk_size, vocab_chunk_size)
    out = _tiled(
        hidden, unembed, targets, int(chunk_size), int(vocab_chunk_size), bool(with_entropy)
    )
    # functools.partial(jax.custom_vjp, ...) hides the wrapped function's return type.
    return cast(tuple[jax.Array, jax.Array], out)


def token_logprobs(hidden, unembed, targets, *, chunk_size=1024):
    """Per-token target log-probs without materialising the ``[N, V]`` logits.

    hidden ``[N, d]`` (fp32 or bf16), unembed ``[d, V]``, targets ``[N]`` int -> ``[N]`` fp32.
    Differentiable in ``hidden`` and ``unembed`` (custom VJP; residuals: the inputs and the
    ``[N]`` log-sum-exp). Extra memory: a few ``[chunk_size, VOCAB_CHUNK_SIZE]`` fp32 tiles;
    the backward pass adds an ``[N, Vb]`` logit cotangent in the inputs' dtype (Vb <=
    VOCAB_CHUNK_SIZE, narrower for large N), an fp32 ``[N, d]`` accumulator and an fp32
    ``[d, Vb]`` block of d_unembed. On GPUs a ``chunk_size`` of 4096 is faster than 1024.
    """
    return tiled_token_logprobs_and_entropy(
        hidden, unembed, targets, chunk_size=chunk_size, with_entropy=False
    )[0]


def token_logprobs_and_entropy(hidden, unembed, targets, *, chunk_size=1024):
    """(``[N]`` target log-probs, ``[N]`` softmax entropies), fp32, tiled like
    :func:`token_logprobs`; both outputs are differentiable (the residuals add the ``[N]``
    entropies)."""
    return tiled_token_logprobs_and_entropy(
        hidden, unembed, targets, chunk_size=chunk_size, with_entropy=True
    )
