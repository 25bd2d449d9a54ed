"""Memory-lean per-token log-probs and entropies straight from final hidden states.

Owns the language-model head of the losses: given final-normed hidden states ``[N, d]``, the
unembedding ``[d, V]`` and target ids ``[N]``, compute ``log softmax(h @ W)[target]`` (and the
softmax entropy) WITHOUT ever holding the ``[N, V]`` logits. Rows are processed in chunks of
``chunk_size`` (a ``lax.map`` / ``lax.scan`` over ``[chunk_size, V]`` logit blocks) and a
``jax.custom_vjp`` keeps only the inputs and O(N) row statistics (log-sum-exp, entropy) for the
backward pass, which recomputes each chunk's logits and accumulates ``d_hidden`` per chunk and
``d_unembed`` in an fp32 ``[d, V]`` carry. Four matmuls per call for value and gradient (one
forward, three backward); see benchmarks/README.md for the measured cost.

Numerics: logits are accumulated in fp32 (``preferred_element_type``), whatever the input
dtype; the backward matmuls feed the logit cotangent in the inputs' dtype (bf16 stays bf16 on
the tensor cores) and accumulate in fp32. Gradients are returned in the inputs' dtypes.

Padding and masking: ``N`` need not be a multiple of ``chunk_size`` (rows are padded with zeros
internally and dropped again). Targets outside ``[0, V)`` are allowed (e.g. a pad id of -100)
and give the finite value ``-logsumexp`` with no one-hot term; masking such positions out of a
loss is the caller's business. Every row yields finite values and gradients for finite inputs.

The ``naive_*`` functions materialise the logits; they are the references for tests and
benchmarks, not for training.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
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


# ----------------------------------------------------------------------------- chunked core


def _chunk_stats(h_c, unembed, t_c, with_entropy):
    """One row chunk: (target log-prob, logsumexp, entropy) ``[C]`` each, fp32.

    The target logit is picked with an iota comparison rather than a gather so that any
    target id (in range or not) stays finite.
    """
    z = jnp.dot(h_c, unembed, preferred_element_type=jnp.float32)  # [C, V]
    m = jnp.max(z, axis=-1, keepdims=True)
    zc = z - m
    e = jnp.exp(zc)
    s = jnp.sum(e, axis=-1)
    lse = m[:, 0] + jnp.log(s)
    hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == t_c[:, None]
    z_t = jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
    if with_entropy:
        # H = log s - E_p[z - m]: same exponentials, and shifting by m avoids the
        # cancellation of lse - E_p[z] when logits are large.
        ent = jnp.log(s) - jnp.sum(e * zc, axis=-1) / s
    else:
        ent = jnp.zeros_like(lse)
    return z_t - lse, lse, ent


def _pad_rows(x, n_pad):
    if n_pad == 0:
        return x
    return jnp.pad(x, [(0, n_pad)] + [(0, 0)] * (x.ndim - 1))


def _split_chunks(hidden, targets, chunk_size):
    """Pad rows to a multiple of the chunk and reshape to ``[K, C, ...]``."""
    n = hidden.shape[0]
    c = max(1, min(int(chunk_size), n))
    k = -(-n // c)
    n_pad = k * c - n
    h = _pad_rows(hidden, n_pad).reshape(k, c, hidden.shape[1])
    t = _pad_rows(targets.astype(jnp.int32), n_pad).reshape(k, c)
    return h, t, n_pad


def _forward(hidden, unembed, targets, chunk_size, with_entropy):
    n = hidden.shape[0]
    h, t, _ = _split_chunks(hidden, targets, chunk_size)
    lp, lse, ent = jax.lax.map(
        lambda xs: _chunk_stats(xs[0], unembed, xs[1], with_entropy), (h, t)
    )
    return lp.reshape(-1)[:n], lse.reshape(-1)[:n], ent.reshape(-1)[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(hidden, unembed, targets, chunk_size, with_entropy):
    lp, _, ent = _forward(hidden, unembed, targets, chunk_size, with_entropy)
    return lp, ent


def _chunked_fwd(hidden, unembed, targets, chunk_size, with_entropy):
    lp, lse, ent = _forward(hidden, unembed, targets, chunk_size, with_entropy)
    return (lp, ent), (hidden, unembed, targets, lse, ent)


def _chunked_bwd(chunk_size, with_entropy, res, cts):
    hidden, unembed, targets, lse, ent = res
    g_lp, g_ent = cts
    n, d = hidden.shape
    v = unembed.shape[1]
    cdt = jnp.result_type(hidden.dtype, unembed.dtype)
    h, t, n_pad = _split_chunks(hidden, targets, chunk_size)
    k, c = t.shape
    # Padding rows get zero cotangents, so they add nothing to d_unembed.
    g_lp = _pad_rows(g_lp.astype(jnp.float32), n_pad).reshape(k, c)
    lse_c = _pad_rows(lse, n_pad).reshape(k, c)
    if with_entropy:
        g_ent = _pad_rows(g_ent.astype(jnp.float32), n_pad).reshape(k, c)
        ent_c = _pad_rows(ent, n_pad).reshape(k, c)
    else:
        g_ent = ent_c = jnp.zeros((k, c), jnp.float32)
    w = unembed.astype(cdt)

    def step(d_w, xs):
        h_c, t_c, g_c, lse_cc, ge_c, ent_cc = xs
        h_c = h_c.astype(cdt)
        z = jnp.dot(h_c, w, preferred_element_type=jnp.float32)  # recomputed [C, V]
        logp = z - lse_cc[:, None]
        p = jnp.exp(logp)
        hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == t_c[:, None]
        # d lp / dz = onehot - p;  d H / dz = -p (log p + H).
        dz = jnp.where(hit, g_c[:, None], 0.0) - g_c[:, None] * p
        if with_entropy:
            dz = dz - ge_c[:, None] * p * (logp + ent_cc[:, None])
        dz = dz.astype(cdt)
        dh_c = jnp.dot(dz, w.T, preferred_element_type=jnp.float32)
        d_w = d_w + jnp.dot(h_c.T, dz, preferred_element_type=jnp.float32)
        return d_w, dh_c

    d_w0 = jnp.zeros((d, v), jnp.float32)
    d_w, dh = jax.lax.scan(step, d_w0, (h, t, g_lp, lse_c, g_ent, ent_c))
    dh = dh.reshape(k * c, d)[:n]
    return dh.astype(hidden.dtype), d_w.astype(unembed.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


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


def token_logprobs(hidden, unembed, targets, *, chunk_size=1024):
    """Per-token target log-probs, chunked over rows, never holding ``[N, V]`` logits.

    hidden ``[N, d]`` (fp32 or bf16), unembed ``[d, V]``, targets ``[N]`` int -> ``[N]`` fp32.
    Differentiable in ``hidden`` and ``unembed`` (custom VJP; residuals: inputs + ``[N]``
    logsumexp). Peak extra memory is a few ``[chunk_size, V]`` fp32 blocks plus, in the
    backward pass, an fp32 ``[d, V]`` accumulator.
    """
    _check(hidden, unembed, targets)
    return _chunked(hidden, unembed, targets, int(chunk_size), False)[0]


def token_logprobs_and_entropy(hidden, unembed, targets, *, chunk_size=1024):
    """(``[N]`` target log-probs, ``[N]`` softmax entropies), fp32, chunked like
    :func:`token_logprobs`; both outputs are differentiable (residuals add the ``[N]``
    entropies)."""
    _check(hidden, unembed, targets)
    return _chunked(hidden, unembed, targets, int(chunk_size), True)
