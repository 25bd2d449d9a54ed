"""Decoder-only transformer (Llama-3, Qwen2) as pure functions of a param pytree, with HF
config/safetensors import and export, a KV cache for sampling and logical sharding axes."""

from advgame_jax.models.config import ModelConfig
from advgame_jax.models.hf_io import hf_state_dict, load_hf, save_hf
from advgame_jax.models.params import init_params, param_logical_axes
from advgame_jax.models.transformer import forward, forward_hidden, unembedding

__all__ = [
    "ModelConfig", "load_hf", "save_hf", "hf_state_dict", "forward", "forward_hidden",
    "unembedding", "init_params", "param_logical_axes",
]
