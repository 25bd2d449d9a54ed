"""KV cache and the cached forward pass used by the JAX sampler (prefill and decode).

Contract (the sampler is built on it):

* ``init_cache(config, batch_size, max_len, dtype=bf16) -> KVCache`` with ``k`` and ``v`` of
  shape ``[layers, batch, kv_heads, max_len, head_dim]`` (zeros). Heads before slots: one
  layer's keys of one (row, head) are contiguous, so the attention dots read the cache as
  stored (batch dims leading) instead of transposing a copy of it every layer and step.
* ``forward_with_cache(params, config, tokens [B, T] int32, positions [B, T] int32, cache,
  CacheSlots(cache_index, kv_mask [B, max_len] bool), *, compute_dtype=None,
  last_only=False) -> (logits, new_cache)``. ``tokens[:, t]`` is written to cache slot ``cache_index + t`` for
  every row (``cache_index`` is an int32 scalar, may be traced). ``kv_mask[b, j]`` says
  whether slot j holds a real token, INCLUDING the T slots written by this call. A query at
  slot ``cache_index + t`` attends to slots ``j <= cache_index + t`` with ``kv_mask[b, j]``.
  Logits are fp32 ``[B, T, V]``, or ``[B, V]`` for the last token when ``last_only``.
  Prefill: the (left-padded) prompts at ``cache_index = 0`` with pad slots False in
  ``kv_mask``; decode: ``T = 1`` at ``cache_index = prompt_len + i``.

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
    _resolve_dtype,
    attend,
    attn_out_and_mlp,
    embed,
    logits_from_hidden,
    project_qkv,
    rms_norm,
    rope_tables,
)


def attend_cached(q, k, v, mask):
    """Grouped-query attention over the cache layout: q ``[B, T, H, hd]``, k/v ``[B, K, S,
    hd]`` (one layer of the cache), mask ``[B, T, S]`` → ``[B, T, H, hd]``."""
    return attend(q, k, v, mask, kv_layout="bksh")


@flax.struct.dataclass
class KVCache:
    """Rotated keys and values per layer: ``k``, ``v`` ``[L, B, K, max_len, hd]``."""

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """An all-zeros cache for ``batch_size`` rows of ``max_len`` slots."""
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


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
    zero = jnp.zeros((), jnp.int32)

    def layer_fn(carry, xs):
        x, ck, cv = carry
        layer, li = xs  # li: this layer's index into the stacked cache
        h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
        q, k, v = project_qkv(layer, config, h, cos, sin)
        start = (li, zero, zero, cache_index, zero)
        k = jnp.swapaxes(k, 1, 2).astype(ck.dtype)[None]  # [1, B, K, T, hd]
        v = jnp.swapaxes(v, 1, 2).astype(cv.dtype)[None]
        ck = jax.lax.dynamic_update_slice(ck, k, start)
        cv = jax.lax.dynamic_update_slice(cv, v, start)
        k_all = jax.lax.dynamic_index_in_dim(ck, li, 0, keepdims=False)
        v_all = jax.lax.dynamic_index_in_dim(cv, li, 0, keepdims=False)
        x = attn_out_and_mlp(
            layer, config, x, attend_cached(q, k_all, v_all, mask), flat_heads=True
        )
        return (x, ck, cv), None

    layer_ids = jnp.arange(config.num_layers, dtype=jnp.int32)
    (x, ck, cv), _ = jax.lax.scan(
        layer_fn, (embed(params, tokens, dtype), cache.k, cache.v), (params["layers"], layer_ids)
    )
    if last_only:
        x = x[:, -1]
    hidden = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    return logits_from_hidden(params, config, hidden), KVCache(k=ck, v=cv)
