"""GGUF (llama.cpp) file → Hugging Face directory: dequantized weights, config, tokenizer, chat template.

``gguf_to_hf(path, out_dir)`` reads a Llama or Qwen2 GGUF with the ``gguf`` package (extra
``real-model``), dequantizes every tensor to float32 (``gguf.quants.dequantize``), undoes the
row permutation llama.cpp applies to Llama's q/k projections (its converter interleaves the two
RoPE halves of each head), maps llama.cpp tensor names to Hugging Face names, and writes

- ``config.json`` / ``generation_config.json`` through ``ModelConfig`` (so only what the JAX
  model computes identically is accepted; anything else raises one ``GGUFError``);
- ``model.safetensors`` (float32, or bfloat16 with ``dtype="bfloat16"``), streamed tensor by
  tensor;
- ``tokenizer.json`` + ``tokenizer_config.json`` built with ``tokenizers`` from the GGUF
  vocabulary and merges, with the pre-tokenizer llama.cpp uses for the file's ``pre`` type;
- ``chat_template.jinja`` from ``tokenizer.chat_template``.

Floats that GGUF stores as float32 (``rms_norm_eps``, ``rope_theta``) are written as the
shortest decimal that rounds to the same float32 (``9.999999747e-06`` → ``1e-05``): every
float32 computation with either value is identical, and the file reads like the original.
The output is built aside and renamed into place; an existing ``out_dir`` is refused.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np

from advgame_jax.errors import UserError
from advgame_jax.fsutil import build_dir_atomically
from advgame_jax.models.config import ModelConfig

KIND = "gguf_to_hf"

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Pre-tokenizer split patterns by tokenizer.ggml.pre (the regexes of the original tokenizers).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2 byte-level splitting, preceded by single-digit splitting for these vocabularies.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact")
_PLAIN_GPT2 = ("gpt2", "default")


class GGUFError(UserError, ValueError):
    """A GGUF file this converter cannot turn into an exact Hugging Face checkpoint."""


def _reader(path: str):
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - depends on the environment
        raise GGUFError(
            "reading a GGUF file needs the `gguf` package: "
            "pip install 'advgame_jax[real-model]' (or pip install gguf)"
        ) from None
    if not os.path.isfile(path):
        raise GGUFError(f"--gguf {path!r}: no such file")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on a bad file
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _src(reader) -> str:
    """The file a reader reads (for messages)."""
    return str(getattr(reader.data, "filename", None) or "<gguf>")


_REQUIRED = object()


def _get(reader, key: str, default: Any = _REQUIRED) -> Any:
    """Metadata field ``key`` (GGUF values are of any type), or ``default``; without a
    default, a missing field is a GGUFError naming it."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise GGUFError(f"{_src(reader)}: metadata {key!r} is missing")
        return default
    return field.contents()


def _f32_decimal(v: float) -> float:
    """The shortest decimal that rounds to the same float32 as ``v``."""
    return float(str(np.float32(v)))


def read_config(reader) -> ModelConfig:
    """The ``ModelConfig`` a GGUF file describes (llama or qwen2 architecture)."""
    arch = _get(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise GGUFError(
            f"{_src(reader)}: general.architecture={arch!r}; expected 'llama' or 'qwen2'"
        )
    scaling = _get(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise GGUFError(
            f"{_src(reader)}: {arch}.rope.scaling.type={scaling!r}; only plain RoPE is converted"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError(
            f"{_src(reader)}: has rope_freqs.weight (llama3 RoPE scaling); only plain "
            "RoPE is converted"
        )
    heads = int(_get(reader, f"{arch}.attention.head_count"))
    hidden = int(_get(reader, f"{arch}.embedding_length"))
    vocab = _get(reader, f"{arch}.vocab_size", None)
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _get(reader, "tokenizer.ggml.eos_token_id", None)
    d = {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_get(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_get(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_get(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_get(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": _f32_decimal(_get(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_decimal(_get(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_get(reader, f"{arch}.context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _get(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": eos,
        "pad_token_id": _get(reader, "tokenizer.ggml.padding_token_id", None),
    }
    rope_dim = _get(reader, f"{arch}.rope.dimension_count", d["head_dim"])
    if int(rope_dim) != d["head_dim"]:
        raise GGUFError(
            f"{_src(reader)}: {arch}.rope.dimension_count={rope_dim} differs from the "
            f"head dim {d['head_dim']}; partial RoPE is not supported"
        )
    try:
        return ModelConfig.from_hf_dict(d, source=_src(reader))
    except ValueError as e:
        raise GGUFError(str(e)) from None


def _hf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"model.layers.{int(parts[1])}.{_LAYER[parts[2]]}"
    raise GGUFError(f"unexpected tensor {name!r} in the GGUF file")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head it stores rows (0, d/2, 1, d/2+1, …)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(reader, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array in torch layout)`` for every tensor, in file order."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = _hf_name(t.name)
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"{_src(reader)}: tensor {t.name}: {e}") from None
        w = np.asarray(w, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if config.model_type == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            n = config.num_heads if ".attn_q." in t.name else config.num_kv_heads
            w = _unpermute(w, n)
        yield name, w


def _pre_tokenizer(reader):
    """``(pre-tokenizer, tokenizer.ggml.pre)`` of a byte-level BPE vocabulary."""
    from tokenizers import Regex, pre_tokenizers

    tok_model = _get(reader, "tokenizer.ggml.model")
    if tok_model != "gpt2":
        raise GGUFError(
            f"{_src(reader)}: tokenizer.ggml.model={tok_model!r}; only byte-level BPE "
            "('gpt2': Llama-3, Qwen2, SmolLM) is converted"
        )
    pre = _get(reader, "tokenizer.ggml.pre", "default")
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in _DIGITS_THEN_GPT2:
        pt = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    elif pre in _PLAIN_GPT2:
        pt = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre in ("llama-bpe", "qwen2"):
        split = _LLAMA3_SPLIT if pre == "llama-bpe" else _QWEN2_SPLIT
        pt = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), bl])
    else:
        raise GGUFError(
            f"{_src(reader)}: tokenizer.ggml.pre={pre!r}; expected one of "
            f"{sorted(_DIGITS_THEN_GPT2 + _PLAIN_GPT2 + ('llama-bpe', 'qwen2'))}"
        )
    return pt, pre


def _bpe_model(reader, tokens: list, pre: str):
    """The BPE model of the file's vocabulary and merges."""
    from tokenizers import models

    merges = [tuple(m.split(" ", 1)) for m in _get(reader, "tokenizer.ggml.merges", [])]
    try:
        return models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            ignore_merges=pre == "llama-bpe",
            fuse_unk=False,
            byte_fallback=False,
        )
    except Exception as e:  # tokenizers raises a bare Exception for an inconsistent vocab
        raise GGUFError(
            f"{_src(reader)}: tokenizer.ggml.tokens/merges do not form a BPE vocabulary ({e})"
        ) from None


def _add_typed_tokens(tk, tokens: list, types: list) -> None:
    """Register control (token_type 3, special) and user-defined (4, added) tokens."""
    from tokenizers import AddedToken

    tk.add_tokens(
        [
            AddedToken(tokens[i], special=types[i] == 3, normalized=False)
            for i in range(len(tokens))
            if types[i] in (3, 4)
        ]
    )
    tk.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i in range(len(tokens))
            if types[i] == 3
        ]
    )


def _add_bos_processor(reader, tk, token) -> bool:
    """With ``tokenizer.ggml.add_bos_token``, prepend BOS to every encoding; returns the flag."""
    add_bos = bool(_get(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos and token("bos") is not None:
        from tokenizers import processors

        bos = token("bos")
        bos_id = int(_get(reader, "tokenizer.ggml.bos_token_id"))
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return add_bos


def _tokenizer_config(reader, token, add_bos: bool) -> dict:
    """The ``tokenizer_config.json`` entries: class, BOS flag, context length, special tokens."""
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "model_max_length": int(
            _get(reader, f"{_get(reader, 'general.architecture')}.context_length")
        ),
    }
    for key, field in (
        ("bos", "bos_token"),
        ("eos", "eos_token"),
        ("unknown", "unk_token"),
        ("padding", "pad_token"),
    ):
        if token(key) is not None:
            cfg[field] = token(key)
    return cfg


def build_tokenizer(reader):
    """``(tokenizers.Tokenizer, tokenizer_config dict, chat template or None)``."""
    from tokenizers import Tokenizer, decoders

    pt, pre = _pre_tokenizer(reader)
    tokens = list(_get(reader, "tokenizer.ggml.tokens"))
    types = list(_get(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tk = Tokenizer(_bpe_model(reader, tokens, pre))
    tk.pre_tokenizer = pt
    tk.decoder = decoders.ByteLevel()
    _add_typed_tokens(tk, tokens, types)

    def token(key):
        i = _get(reader, f"tokenizer.ggml.{key}_token_id", None)
        return None if i is None else tokens[int(i)]

    add_bos = _add_bos_processor(reader, tk, token)
    cfg = _tokenizer_config(reader, token, add_bos)
    return tk, cfg, _get(reader, "tokenizer.chat_template", None)


def gguf_to_hf(gguf_path: str, out_dir: str, *, dtype: str = "float32") -> str:
    """Convert ``gguf_path`` into the new directory ``out_dir``; returns its absolute path."""
    from advgame_jax.models.hf_io import _write_safetensors

    if dtype not in ("float32", "bfloat16"):
        raise GGUFError(f"--dtype={dtype!r}; expected 'float32' or 'bfloat16'")
    if os.path.lexists(out_dir):
        raise GGUFError(f"--out_dir {out_dir!r} already exists; choose a new directory")
    reader = _reader(os.fspath(gguf_path))
    config = read_config(reader)
    tokenizer, tok_cfg, template = build_tokenizer(reader)
    if config.vocab_size < tokenizer.get_vocab_size():
        raise GGUFError(
            f"{gguf_path}: {tokenizer.get_vocab_size()} tokens but vocab_size {config.vocab_size}"
        )
    np_dt = np.dtype(np.float32) if dtype == "float32" else np.dtype("bfloat16")
    specs = [
        (_hf_name(t.name), tuple(int(n) for n in reversed(t.shape)), np_dt) for t in reader.tensors
    ]

    def build(tmp: str) -> None:
        cfg = config.to_hf_dict()
        cfg["torch_dtype"] = dtype
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        gen = {
            k: cfg[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if cfg[k] is not None
        }
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        _write_safetensors(
            os.path.join(tmp, "model.safetensors"), specs, hf_tensors(reader, config)
        )
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tok_cfg, f, indent=2)
        if template:
            with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(template)

    return build_dir_atomically(os.path.abspath(out_dir), KIND, build)
