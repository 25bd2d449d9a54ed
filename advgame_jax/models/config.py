"""ModelConfig: the static description of a Llama-3 / Qwen2 decoder, read from and written to
a Hugging Face ``config.json``.

Supported: ``LlamaForCausalLM`` (``model_type == "llama"``: grouped KV heads, ``rope_theta``,
optional ``rope_scaling`` of type ``llama3``, tied or untied head, no attention/MLP bias) and
``Qwen2ForCausalLM`` (``model_type == "qwen2"``: q/k/v bias, usually tied embeddings, large
``rope_theta``, sliding window disabled). Both the legacy layout (top-level ``rope_theta`` +
``rope_scaling``) and the transformers-5 layout (``rope_parameters``) are read. Anything this
package would silently compute differently raises one ``ValueError`` naming the field and file.

The config is a frozen, hashable dataclass so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Union

import numpy as np

_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _unsupported(source: str, field: str, value, expected: str) -> ValueError:
    return ValueError(f"{source}: unsupported {field}={value!r}; expected {expected}")


def _check_hf_architecture(d: dict[str, Any], source: str) -> str:
    """The ``model_type`` of an HF config this model implements (else ValueError naming the
    field): architecture, activation, biases, attention pattern, rotary fraction."""
    model_type = d.get("model_type")
    if model_type not in _ARCHS:
        raise _unsupported(source, "model_type", model_type, f"one of {sorted(_ARCHS)}")
    archs = d.get("architectures") or [_ARCHS[model_type]]
    if list(archs) != [_ARCHS[model_type]]:
        raise _unsupported(source, "architectures", archs, f"[{_ARCHS[model_type]!r}]")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported(source, "hidden_act", act, "'silu'")
    if model_type == "llama":
        for field in ("attention_bias", "mlp_bias"):
            if d.get(field, False):
                expected = "false (biases are supported on qwen2 q/k/v only)"
                raise _unsupported(source, field, d[field], expected)
    else:
        if d.get("use_sliding_window", False):
            raise _unsupported(source, "use_sliding_window", d["use_sliding_window"], "false")
        layer_types = d.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise _unsupported(source, "layer_types", layer_types, "only 'full_attention'")
    for field in ("partial_rotary_factor",):
        if d.get(field, 1.0) != 1.0:
            raise _unsupported(source, field, d[field], "1.0")
    return model_type


def _hf_rope(d: dict[str, Any], source: str) -> tuple[dict, str, float, str]:
    """``(rope params, their field name, rope_theta, rope_type)`` of an HF config.
    transformers 5 writes ``rope_parameters``; older files ``rope_theta`` and ``rope_scaling``."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise _unsupported(source, f"{rope_field}.rope_type", rope_type, "'default' or 'llama3'")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        field = f"{rope_field}.partial_rotary_factor"
        raise _unsupported(source, field, rope["partial_rotary_factor"], "1.0")
    return rope, rope_field, rope_theta, rope_type


def _llama3_rope(rope: dict, rope_field: str, max_pos: int, source: str) -> dict[str, Any]:
    """The ``ModelConfig`` fields of Llama-3 RoPE scaling."""
    try:
        return dict(
            rope_type="llama3",
            rope_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", max_pos)),
        )
    except KeyError as e:
        raise ValueError(f"{source}: {rope_field} of type llama3 lacks {e.args[0]!r}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and numerics of one decoder-only model (hashable; a jit static arg)."""

    model_type: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # llama3 rope scaling; rope_type None means plain RoPE.
    rope_type: Optional[str] = None
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, tuple[int, ...]]] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def architecture(self) -> str:
        return _ARCHS[self.model_type]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids as a tuple (empty when unknown)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies ``[head_dim // 2]`` float32, with llama3 scaling if set.

        The float32 steps of the reference implementation (exponents ``i / dim`` and the
        reciprocal in float32), with ``theta ** exponent`` rounded correctly to float32 (via
        float64), which is what torch's float32 power returns; numpy's float32 power is off by
        one ulp for some exponents, and that ulp times the position moved the rotation angles
        by ~1e-6 at position 50 (measured: 5 of 32 frequencies of SmolLM2, theta 1e5).
        """
        dim = self.head_dim
        exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        power = np.float64(np.float32(self.rope_theta)) ** exps.astype(np.float64)
        inv_freq = (np.float32(1.0) / power.astype(np.float32)).astype(np.float32)
        if self.rope_type != "llama3":
            return inv_freq
        factor = self.rope_factor
        low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
        old_len = self.rope_original_max_position
        low_freq_wavelen = old_len / low
        high_freq_wavelen = old_len / high
        wavelen = (2 * np.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "<config dict>") -> "ModelConfig":
        """Build from a parsed HF ``config.json``; ``source`` names the file in errors."""
        model_type = _check_hf_architecture(d, source)
        rope, rope_field, rope_theta, rope_type = _hf_rope(d, source)

        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // num_heads
        # Absent fields take the transformers class defaults.
        max_pos = int(d.get("max_position_embeddings", 2048 if model_type == "llama" else 32768))
        kw: dict[str, Any] = {}
        if rope_type == "llama3":
            kw = _llama3_rope(rope, rope_field, max_pos, source)
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(int(e) for e in eos)
        try:
            return cls(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2",
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos,
                pad_token_id=d.get("pad_token_id"),
                **kw,
            )
        except KeyError as e:
            raise ValueError(f"{source}: required field {e.args[0]!r} is missing") from None
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_hf_file(cls, path: Union[str, os.PathLike]) -> "ModelConfig":
        """Read ``path`` (a ``config.json`` or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: config.json not found")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF ``config.json`` dict (legacy rope layout, read by transformers 4/5 and vLLM)."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                list(self.eos_token_id)
                if isinstance(self.eos_token_id, tuple)
                else self.eos_token_id
            ),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            d.update(attention_bias=False, mlp_bias=False)
        else:
            d.update(
                use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers
            )
        if self.rope_type == "llama3":
            d["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position,
            }
        else:
            d["rope_scaling"] = None
        return d
