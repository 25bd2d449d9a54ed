"""Tiny random Hugging Face checkpoints (Llama-3 and Qwen2) built with transformers + torch.

Each helper builds a model with a deliberately wide random init (kernels ~ N(0, std²) with
std 0.15, norm weights ~ U(0.5, 1.5), biases ~ N(0, 0.1²)) so logits are far from uniform and
layout bugs (transposes, head order, norms, biases) change the output; saves it with
``save_pretrained`` (safetensors) into ``path``; and returns the torch model in eval mode
(fp32, eager attention, so masks behave exactly as given).
"""

from __future__ import annotations

import os

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so with head_dim 32 some wavelengths exceed 64 (scaled) and some lie in 16..64
    # (smoothed): the llama3 scaling really changes the tiny model's frequencies.
    "original_max_position_embeddings": 64,
}


def _randomise(model, seed: int, std: float):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def _save(model, path, max_shard_size):
    os.makedirs(path, exist_ok=True)
    if max_shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)


def make_tiny_llama(
    path,
    *,
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    seed=0,
    tie=False,
    rope_scaling=LLAMA3_ROPE,
    rope_theta=500000.0,
    max_position_embeddings=512,
    std=0.15,
    eos_token_id=2,
    max_shard_size=None,
):
    """Save a random ``LlamaForCausalLM`` (GQA, llama3 RoPE by default) to ``path``; return it.

    ``rope_scaling=None`` gives plain RoPE. ``max_shard_size`` (e.g. ``"20KB"``) forces a
    sharded checkpoint with ``model.safetensors.index.json``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope = dict(rope_scaling, rope_theta=rope_theta)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=eos_token_id,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = _randomise(LlamaForCausalLM(config), seed, std)
    _save(model, path, max_shard_size)
    return model


def make_tiny_qwen2(
    path,
    *,
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=32,
    seed=0,
    tie=True,
    rope_theta=1000000.0,
    max_position_embeddings=512,
    std=0.15,
    eos_token_id=(2, 3),
    max_shard_size=None,
):
    """Save a random ``Qwen2ForCausalLM`` (q/k/v bias, tied embeddings by default) to ``path``.

    Defaults keep ``head_dim == hidden_size // num_heads`` (as in every real Qwen2, and as
    vLLM assumes) with 2 query heads sharing 1 KV head.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tie,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=list(eos_token_id),
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = _randomise(Qwen2ForCausalLM(config), seed, std)
    _save(model, path, max_shard_size)
    return model
