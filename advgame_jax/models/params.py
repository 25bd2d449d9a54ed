"""The parameter pytree: its shapes, logical sharding axes and random initialisation.

Param tree (nested dicts of arrays; L layers stacked on the leading axis, matmul kernels stored
``[in, out]`` with heads split out so head-parallel sharding never cuts a head):

    {
      "embed":       [V, d]                       logical ("vocab", "embed")
      "layers": {
        "attn_norm": [L, d]                       ("layers", None)
        "q_proj":    [L, d, H, hd]                ("layers", "embed", "q_heads", "head_dim")
        "k_proj":    [L, d, K, hd]                ("layers", "embed", "kv_heads", "head_dim")
        "v_proj":    [L, d, K, hd]                ("layers", "embed", "kv_heads", "head_dim")
        "q_bias":    [L, H, hd]    (qwen2 only)   ("layers", "q_heads", "head_dim")
        "k_bias":    [L, K, hd]    (qwen2 only)   ("layers", "kv_heads", "head_dim")
        "v_bias":    [L, K, hd]    (qwen2 only)   ("layers", "kv_heads", "head_dim")
        "o_proj":    [L, H, hd, d]                ("layers", "q_heads", "head_dim", "embed")
        "mlp_norm":  [L, d]                       ("layers", None)
        "gate_proj": [L, d, F]                    ("layers", "embed", "mlp")
        "up_proj":   [L, d, F]                    ("layers", "embed", "mlp")
        "down_proj": [L, F, d]                    ("layers", "mlp", "embed")
      },
      "final_norm":  [d]                          (None,)
      "lm_head":     [d, V]        (untied only)  ("embed", "vocab")
    }

HF ``model.layers.{i}.self_attn.q_proj.weight`` ``[H*hd, d]`` is ``q_proj[i]`` reshaped and
transposed; see ``advgame_jax.models.hf_io`` for the full name map.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from advgame_jax.models.config import ModelConfig


def param_shapes_and_axes(config: ModelConfig) -> dict:
    """``{name: (shape, logical_axes)}`` nested like the param tree."""
    c = config
    L, d, H, K, hd, F, V = (
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
    )
    layers = {
        "attn_norm": ((L, d), ("layers", None)),
        "q_proj": ((L, d, H, hd), ("layers", "embed", "q_heads", "head_dim")),
        "k_proj": ((L, d, K, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "v_proj": ((L, d, K, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "o_proj": ((L, H, hd, d), ("layers", "q_heads", "head_dim", "embed")),
        "mlp_norm": ((L, d), ("layers", None)),
        "gate_proj": ((L, d, F), ("layers", "embed", "mlp")),
        "up_proj": ((L, d, F), ("layers", "embed", "mlp")),
        "down_proj": ((L, F, d), ("layers", "mlp", "embed")),
    }
    if c.qkv_bias:
        layers["q_bias"] = ((L, H, hd), ("layers", "q_heads", "head_dim"))
        layers["k_bias"] = ((L, K, hd), ("layers", "kv_heads", "head_dim"))
        layers["v_bias"] = ((L, K, hd), ("layers", "kv_heads", "head_dim"))
    tree = {
        "embed": ((V, d), ("vocab", "embed")),
        "layers": layers,
        "final_norm": ((d,), (None,)),
    }
    if not c.tie_word_embeddings:
        tree["lm_head"] = ((d, V), ("embed", "vocab"))
    return tree


def _is_leaf(x):
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def param_logical_axes(config: ModelConfig) -> dict:
    """Pytree matching the params whose leaves are tuples of logical axis names (or None)."""
    return jax.tree.map(lambda sa: sa[1], param_shapes_and_axes(config), is_leaf=_is_leaf)


def param_shapes(config: ModelConfig, dtype=jnp.float32) -> dict:
    """Pytree of ``jax.ShapeDtypeStruct`` matching the params."""
    return jax.tree.map(
        lambda sa: jax.ShapeDtypeStruct(sa[0], jnp.dtype(dtype)),
        param_shapes_and_axes(config),
        is_leaf=_is_leaf,
    )


def init_params(config: ModelConfig, key, dtype=jnp.float32, *, std: float = 0.02) -> dict:
    """Random params: kernels and embeddings ~ N(0, std²), norms 1, biases 0.

    ``key`` is a ``jax.random`` key; ``dtype`` the storage dtype of every leaf.
    """
    return _init_params(config, key, jnp.dtype(dtype), std)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_params(config: ModelConfig, key, dtype, std: float) -> dict:
    # One normal draw sliced into the kernels: a single threefry program compiles in a
    # fraction of the time of one draw per leaf (init is meant for small offline models).
    shapes = param_shapes_and_axes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_leaf)
    names = [path[-1].key for path, _ in flat]
    random = [not (n.endswith("_norm") or n.endswith("_bias")) for n in names]
    total = sum(math.prod(shape) for (_, (shape, _)), r in zip(flat, random, strict=True) if r)
    draw = std * jax.random.normal(key, (total,), jnp.float32)
    leaves, offset = [], 0
    for (_, (shape, _)), name, r in zip(flat, names, random, strict=True):
        if r:
            size = math.prod(shape)
            leaves.append(draw[offset : offset + size].reshape(shape).astype(dtype))
            offset += size
        elif name.endswith("_norm"):
            leaves.append(jnp.ones(shape, dtype))
        else:
            leaves.append(jnp.zeros(shape, dtype))
    return jax.tree.unflatten(treedef, leaves)
