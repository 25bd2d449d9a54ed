"""Decoder-only transformer (Llama-3, Qwen2) as pure functions of a param pytree, with HF
config/safetensors import and export, a KV cache for sampling and logical sharding axes.

The param tree is documented in ``advgame_jax.models.params``; the KV-cache contract in
``advgame_jax.models.kv_cache``.
"""

from advgame_jax.models.config import ModelConfig
from advgame_jax.models.hf_io import hf_state_dict, load_hf, save_hf
from advgame_jax.models.kv_cache import CacheSlots, KVCache, forward_with_cache, init_cache
from advgame_jax.models.params import init_params, param_logical_axes, param_shapes
from advgame_jax.models.sharding import (
    DEFAULT_RULES,
    logical_sharding,
    logical_to_spec,
    make_mesh,
    param_shardings,
)
from advgame_jax.models.transformer import ForwardOptions, forward, forward_hidden, unembedding

__all__ = [
    "ModelConfig",
    "load_hf",
    "save_hf",
    "hf_state_dict",
    "forward",
    "forward_hidden",
    "ForwardOptions",
    "unembedding",
    "init_params",
    "param_logical_axes",
    "param_shapes",
    "init_cache",
    "forward_with_cache",
    "CacheSlots",
    "KVCache",
    "param_shardings",
    "make_mesh",
    "DEFAULT_RULES",
    "logical_sharding",
    "logical_to_spec",
]
