"""GGUF → HF conversion on hand-written GGUF files: a tiny Llama (q/k rows permuted the way
llama.cpp's converter stores them, untied head) and a tiny Qwen2 (q/k/v biases, no
permutation, tied) are written with ``gguf.GGUFWriter`` from random transformers models; the
conversion must give back the original tensors bit for bit and an equivalent config. Plus one
clear error per bad input."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from advgame_jax.models import ModelConfig
from advgame_jax.models.gguf import GGUFError, gguf_to_hf
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2

gguf = pytest.importorskip("gguf")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _llama_cpp_permute(w, n_head):
    """llama.cpp's q/k row order: per head, the two RoPE halves interleaved."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    i, rest = hf[len("model.layers.") :].split(".", 1)
    for a, b in _NAMES.items():
        if rest.startswith(a):
            return f"blk.{i}.{b}{rest[len(a) :]}"
    raise AssertionError(hf)


def _write_gguf(path, hf_dir, arch, pre):
    from tokenizers import pre_tokenizers

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    tokens = SPECIAL + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens[-2:] = ["he", "ll"]  # two merged tokens in place of two rare byte symbols
    assert len(tokens) == cfg["vocab_size"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_token_merges(["h e", "l l"] + (["Ġ t"] if pre == "bad" else []))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(3)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    for name, t in tensors.items():
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            n = cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"]
            t = _llama_cpp_permute(t, n)
        w.add_tensor(_gguf_name(name), np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors, cfg


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_round_trip_gives_back_the_original_tensors(arch, tmp_path):
    make = make_tiny_llama if arch == "llama" else make_tiny_qwen2
    kw = dict(rope_scaling=None) if arch == "llama" else {}
    make(
        tmp_path / "hf",
        vocab_size=len(SPECIAL) + 256,
        eos_token_id=2 if arch == "llama" else (2,),
        **kw,
    )
    src = tmp_path / "model.gguf"
    tensors, cfg = _write_gguf(
        src, tmp_path / "hf", arch, "default" if arch == "llama" else "qwen2"
    )
    out = gguf_to_hf(str(src), str(tmp_path / "out"))
    got = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(got) == sorted(tensors)
    for k in tensors:
        np.testing.assert_array_equal(got[k], tensors[k], err_msg=k)
    ours, theirs = ModelConfig.from_hf_file(out), ModelConfig.from_hf_file(tmp_path / "hf")
    assert ours.num_heads == theirs.num_heads and ours.num_kv_heads == theirs.num_kv_heads
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings == (arch == "qwen2")
    assert ours.rms_norm_eps == theirs.rms_norm_eps and ours.rope_theta == theirs.rope_theta
    assert ours.qkv_bias == (arch == "qwen2")

    from advgame_jax.tokenization import ChatTokenizer

    tok = ChatTokenizer.from_dir(out)
    ids = tok.render_user_turn("hi there")
    assert ids[0] == 1 and ids[-1] == 1 and 2 in ids  # <|im_start|> … <|im_end|><|im_start|>
    assert tok.decode(tok.encode("héllo wörld 42")) == "héllo wörld 42"
    assert tok.stop_token_ids == (2,) and tok.pad_id == 3


def test_bad_inputs_raise_one_user_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        gguf_to_hf(str(bad), str(tmp_path / "o1"))
    with pytest.raises(GGUFError, match="no such file"):
        gguf_to_hf(str(tmp_path / "missing.gguf"), str(tmp_path / "o2"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(GGUFError, match="already exists"):
        gguf_to_hf(str(bad), str(tmp_path / "taken"))
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="general.architecture='gpt2'"):
        gguf_to_hf(str(tmp_path / "gpt2.gguf"), str(tmp_path / "o3"))
    assert not os.path.exists(tmp_path / "o3")
