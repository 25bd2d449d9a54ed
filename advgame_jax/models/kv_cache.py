"""KV cache and the cached forward pass used by the JAX sampler (prefill and decode).

Contract (the sampler is built on it):

* ``init_cache(config, batch_size, max_len, dtype=bf16) -> KVCache``: zeros, one buffer per
  layer for keys and one for values (``ks``: ``[batch, kv_heads, head_dim, max_len]``, keys
  transposed; ``vs``: ``[batch, kv_heads, max_len, head_dim]``); ``KVCache.k`` / ``.v``
  give both as ``[layers, batch, kv_heads, max_len, head_dim]`` for inspection (a copy).
  Heads before slots, batch dims leading: both attention products read the cache as stored,
  as plain (not transposed) matrix products, the fast form on XLA:CPU. One buffer per layer:
  a step writes each in place and its attention reads it as it is, where slices of one
  stacked buffer would be copied (a layer's K and V every step, on XLA:CPU).
* ``forward_with_cache(params, config, tokens [B, T] int32, positions [B, T] int32, cache,
  CacheSlots(cache_index, kv_mask [B, max_len] bool), *, compute_dtype=None,
  last_only=False) -> (logits, new_cache)``. ``tokens[:, t]`` is written to cache slot ``cache_index + t`` for
  every row (``cache_index`` is an int32 scalar, may be traced). ``kv_mask[b, j]`` says
  whether slot j holds a real token, INCLUDING the T slots written by this call. A query at
  slot ``cache_index + t`` attends to slots ``j <= cache_index + t`` with ``kv_mask[b, j]``.
  Logits are fp32 ``[B, T, V]``, or ``[B, V]`` for the last token when ``last_only``.
  Prefill: the (left-padded) prompts at ``cache_index = 0`` with pad slots False in
  ``kv_mask``; decode: ``T = 1`` at ``cache_index = prompt_len + i``.

``grow_cache(cache, kv_mask, max_len)`` pads a cache and its mask with empty slots (a decode
loop in phases runs each phase on a cache just long enough for it).

The layers run as an unrolled Python loop (the per-layer cache buffers are a tuple).
``params["layers"]`` is the usual stacked dict (each layer a static slice of it) or the
per-layer decode layout of ``split_layers`` (weights transposed to ``[out, in]``, q/k/v and
gate/up fused): a decode loop splits the weights once, before its loop, so no step copies a
layer's weights out of the stack (XLA:CPU copies a dynamic or static slice that feeds a dot).

RoPE uses the given ``positions`` (so left padding is the caller's business: positions count
real tokens), keys are stored already rotated, in the cache dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from advgame_jax.models.config import ModelConfig
from advgame_jax.models.transformer import (
    _NEG,
    _resolve_dtype,
    apply_rope,
    attn_out_and_mlp,
    embed,
    logits_from_hidden,
    project_qkv,
    rms_norm,
    rope_tables,
)


def attend_cached(q, kt, v, mask):
    """Grouped-query attention over the cache layout: q ``[B, T, H, hd]``, kt ``[B, K, hd,
    S]`` and v ``[B, K, S, hd]`` (one layer of the cache), mask ``[B, T, S]`` → ``[B, T, H,
    hd]`` in q.dtype.

    Both products are batched over (row, kv head) with the batch dims leading in operands and
    result, and the T·G queries of a head as the rows of one matrix: XLA:CPU then reads the
    cache as stored in its fast matmul kernels (``transformer.attend``'s einsum order made the
    values' product a strided general dot there, a third of a decode step). Scores and softmax
    in fp32, as ``transformer.attend``.
    """
    b, t, n_q, hd = q.shape
    n_kv = kt.shape[1]
    g = n_q // n_kv
    qg = jnp.transpose(q.reshape(b, t, n_kv, g, hd), (0, 2, 1, 3, 4)).reshape(b, n_kv, t * g, hd)
    batch = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(
        qg, kt.astype(q.dtype), (((3,), (2,)), batch), preferred_element_type=jnp.float32
    )  # [B, K, T·G, S]
    scores = scores.reshape(b, n_kv, t, g, -1) * (hd**-0.5)
    scores = jnp.where(mask[:, None, :, None, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, n_kv, t * g, -1)
    out = jax.lax.dot_general(probs, v.astype(q.dtype), (((3,), (2,)), batch))  # [B,K,T·G,hd]
    out = jnp.transpose(out.reshape(b, n_kv, t, g, hd), (0, 2, 1, 3, 4))
    return out.reshape(b, t, n_q, hd)


@flax.struct.dataclass
class KVCache:
    """Rotated keys and values, one buffer per layer: ``ks`` (a tuple of ``[B, K, hd,
    max_len]``, keys transposed), ``vs`` (a tuple of ``[B, K, max_len, hd]``)."""

    ks: tuple
    vs: tuple

    @property
    def k(self) -> jax.Array:
        """All layers' keys stacked ``[L, B, K, max_len, hd]`` (a copy; for inspection)."""
        return jnp.swapaxes(jnp.stack(self.ks), 3, 4)

    @property
    def v(self) -> jax.Array:
        """All layers' values stacked ``[L, B, K, max_len, hd]`` (a copy; for inspection)."""
        return jnp.stack(self.vs)

    @property
    def max_len(self) -> int:
        return self.vs[0].shape[2]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """An all-zeros cache for ``batch_size`` rows of ``max_len`` slots."""
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    zeros = lambda s: tuple(jnp.zeros(s, dtype) for _ in range(config.num_layers))  # noqa: E731
    return KVCache(ks=zeros(shape[:2] + shape[:1:-1]), vs=zeros(shape))


def grow_cache(cache: KVCache, kv_mask, max_len: int):
    """``cache`` and its ``kv_mask`` ``[B, S]`` extended with empty slots to ``max_len`` (the
    new slots zero and masked out): a decode loop in phases runs each phase on a cache just
    long enough for it, so its attention reads no slot beyond the phase."""
    extra = max_len - cache.max_len
    if extra < 0:
        raise ValueError(f"grow_cache: {max_len} slots < the cache's {cache.max_len}")
    pad = lambda a, axis: jnp.pad(a, [(0, extra if i == axis else 0) for i in range(a.ndim)])  # noqa: E731
    cache = KVCache(ks=tuple(pad(k, 3) for k in cache.ks), vs=tuple(pad(v, 2) for v in cache.vs))
    return cache, pad(jnp.asarray(kv_mask, bool), 1)


def split_layers(params):
    """``params`` with the stacked ``layers`` dict replaced by a tuple of per-layer dicts in
    the decode layout (``forward_with_cache`` takes either form): each product's weights
    transposed to ``[out, in]`` (rows contiguous along the contraction, the faster form of a
    few-row matmul on XLA:CPU) and fused where they share an input: ``qkv`` ``[(H + 2K)·hd,
    d]`` (and ``qkv_bias``), ``o`` ``[d, H·hd]``, ``gate_up`` ``[2F, d]``, ``down`` ``[d, F]``,
    plus both norms. One copy of the layer weights, made once per call of a decode loop."""
    layers = params["layers"]
    if not isinstance(layers, dict):
        return params
    n = layers["q_proj"].shape[0]
    flat = lambda w: w.reshape(w.shape[0], w.shape[1], -1)  # noqa: E731  [L, in, out]
    qkv = jnp.concatenate([flat(layers[f"{x}_proj"]) for x in "qkv"], axis=-1)
    gate_up = jnp.concatenate([layers["gate_proj"], layers["up_proj"]], axis=-1)
    stacked = {
        "attn_norm": layers["attn_norm"],
        "mlp_norm": layers["mlp_norm"],
        "qkv": jnp.swapaxes(qkv, 1, 2),
        "o": jnp.swapaxes(layers["o_proj"].reshape(n, -1, layers["o_proj"].shape[-1]), 1, 2),
        "gate_up": jnp.swapaxes(gate_up, 1, 2),
        "down": jnp.swapaxes(layers["down_proj"], 1, 2),
    }
    if "q_bias" in layers:
        stacked["qkv_bias"] = jnp.concatenate(
            [layers[f"{x}_bias"].reshape(n, -1) for x in "qkv"], axis=-1
        )
    out = dict(params)
    out["layers"] = tuple(jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(n))
    return out


def _rows_times(x, w):
    """``x [..., in] @ w.T`` for a decode-layout weight ``w [out, in]``."""
    return jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))


def _write(ck, cv, k, v, start):
    """Write k, v ``[B, T, K, hd]`` into one layer's cache buffers at slot ``start``."""
    zero = jnp.zeros((), jnp.int32)
    kt = jnp.transpose(k, (0, 2, 3, 1)).astype(ck.dtype)  # [B, K, hd, T]
    ck = jax.lax.dynamic_update_slice(ck, kt, (zero, zero, zero, start))
    cv = jax.lax.dynamic_update_slice(
        cv, jnp.swapaxes(v, 1, 2).astype(cv.dtype), (zero, zero, start, zero)
    )
    return ck, cv


def _split_layer_step(layer, config: ModelConfig, x, rope, cache_kv, where):
    """One layer on decode-layout weights (``split_layers``): the same function as the stacked
    path (``project_qkv``, the cache write, ``attend_cached``, ``attn_out_and_mlp``)."""
    (cos, sin), (ck, cv), (start, mask) = rope, cache_kv, where
    b, t, _ = x.shape
    n_q, n_kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
    qkv = _rows_times(h, layer["qkv"])
    if "qkv_bias" in layer:
        qkv = qkv + layer["qkv_bias"].astype(x.dtype)
    q = apply_rope(qkv[..., : n_q * hd].reshape(b, t, n_q, hd), cos, sin)
    k = apply_rope(qkv[..., n_q * hd : (n_q + n_kv) * hd].reshape(b, t, n_kv, hd), cos, sin)
    v = qkv[..., (n_q + n_kv) * hd :].reshape(b, t, n_kv, hd)
    ck, cv = _write(ck, cv, k, v, start)
    attn = attend_cached(q, ck, cv, mask).reshape(b, t, n_q * hd)
    x = x + _rows_times(attn, layer["o"])
    h = rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
    gate, up = jnp.split(_rows_times(h, layer["gate_up"]), 2, axis=-1)
    return x + _rows_times(jax.nn.silu(gate) * up, layer["down"]), ck, cv


def _stacked_layer_step(layer, config: ModelConfig, x, rope, cache_kv, where):
    """One layer on a static slice of the stacked weights."""
    (cos, sin), (ck, cv), (start, mask) = rope, cache_kv, where
    h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
    q, k, v = project_qkv(layer, config, h, cos, sin)
    ck, cv = _write(ck, cv, k, v, start)
    x = attn_out_and_mlp(layer, config, x, attend_cached(q, ck, cv, mask), flat_heads=True)
    return x, ck, cv


class CacheSlots(NamedTuple):
    """Where one cached call writes (``index``: the first slot, an int32 scalar, may be
    traced) and which slots hold real tokens (``kv_mask`` ``[B, max_len]`` bool, including
    the ones this call writes)."""

    index: Any
    kv_mask: Any


def forward_with_cache(
    params,
    config: ModelConfig,
    tokens,
    positions,
    cache: KVCache,
    where: CacheSlots,
    *,
    compute_dtype=None,
    last_only: bool = False,
):
    """Run ``tokens`` through the model reading and writing ``cache`` (see module docstring)."""
    cache_index, kv_mask = where
    dtype = _resolve_dtype(params, compute_dtype)
    tokens = jnp.asarray(tokens, jnp.int32)
    t = tokens.shape[1]
    cache_index = jnp.asarray(cache_index, jnp.int32)
    slots = jnp.arange(cache.max_len, dtype=jnp.int32)
    query_slots = cache_index + jnp.arange(t, dtype=jnp.int32)
    mask = (slots[None, :] <= query_slots[:, None])[None] & jnp.asarray(kv_mask, bool)[:, None, :]
    cos, sin = rope_tables(config, jnp.asarray(positions, jnp.int32))
    write_at = (cache_index, mask)
    layers = params["layers"]
    split = not isinstance(layers, dict)
    x = embed(params, tokens, dtype)
    ks, vs = [], []
    for li in range(config.num_layers):
        if split:
            step, layer = _split_layer_step, layers[li]
        else:
            step, layer = _stacked_layer_step, jax.tree.map(lambda w, i=li: w[i], layers)
        x, ck, cv = step(layer, config, x, (cos, sin), (cache.ks[li], cache.vs[li]), write_at)
        ks.append(ck)
        vs.append(cv)
    if last_only:
        x = x[:, -1]
    hidden = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return logits_from_hidden(params, config, hidden), KVCache(ks=tuple(ks), vs=tuple(vs))
