"""The decoder forward pass (Llama-3 / Qwen2) as pure functions of the param pytree.

embeddings → N × (RMSNorm → GQA attention with RoPE → residual → RMSNorm → SwiGLU → residual)
→ final RMSNorm → logits. Layers are stacked on a leading axis and run with ``lax.scan`` so a
32-layer model compiles one layer body; ``remat`` wraps that body in ``jax.checkpoint`` with
one of :data:`REMAT_POLICIES` (True = 'full': keep only the layer inputs).

Attention: ``attention_impl`` picks an implementation of
:func:`advgame_jax.models.attention.causal_attention` ('xla', 'chunked', 'cudnn', 'auto').

Partitioning: with a ``mesh``, the residual stream, q/k/v and the MLP activations carry
sharding constraints from the logical rules (rows over the ``batch`` axes, heads and MLP width
over ``tensor``), so a step compiled under FSDP gathers weights, never the batch.

Dtype policy: params may be fp32 or bf16; activations and matmuls run in ``compute_dtype``
(default: the embedding's dtype); RMSNorm statistics, RoPE rotation and softmax run in fp32;
logits are always fp32 (``hidden.astype(f32) @ unembedding.astype(f32)``).

Shapes: B batch, T query length, S key length, d hidden, H query heads, K kv heads,
G = H // K, hd head dim, F MLP width, V vocab, L layers. The param tree is documented in
``advgame_jax.models.params``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from advgame_jax.models.attention import causal_attention
from advgame_jax.models.config import ModelConfig
from advgame_jax.models.dense import cpu_grad_applies, dense
from advgame_jax.models.sharding import DEFAULT_RULES, constrain

# Names of jax.checkpoint policies for the layer body: 'none' (no remat), 'full' (save nothing
# but the layer input), 'dots_no_batch' (also save matmul outputs without batch dims, i.e. none
# of the activations but weight-only products), 'save_attn' (save the attention output, so the
# backward pass does not recompute attention).
REMAT_POLICIES = ("none", "full", "dots_no_batch", "save_attn")


def remat_policy(remat) -> str:
    """Normalise ``remat`` (bool or a policy name) to a name in :data:`REMAT_POLICIES`."""
    if remat is True:
        return "full"
    if remat is False or remat is None:
        return "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {REMAT_POLICIES} or a bool, got {remat!r}")
    return remat


def _checkpointed(fn, policy: str):
    if policy == "none":
        return fn
    cp = jax.checkpoint_policies
    pol = {
        "full": None,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
        "save_attn": cp.save_only_these_names("attn_out"),
    }[policy]
    return jax.checkpoint(fn, policy=pol)


_NEG = jnp.finfo(jnp.float32).min  # finite, so fully masked rows give a uniform row, not NaN


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last axis; statistics in fp32, output in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return xf.astype(x.dtype) * weight.astype(x.dtype)


def rope_tables(config: ModelConfig, positions):
    """cos, sin ``[B, T, hd]`` fp32 for integer ``positions [B, T]`` (rotate-half layout)."""
    inv_freq = jnp.asarray(config.rope_inv_freq())
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Rotate ``x [B, T, n, hd]`` by the tables ``[B, T, hd]``; fp32 math, result in x.dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def project_qkv(layer, config: ModelConfig, h, cos, sin, cpu_grad: bool = False):
    """Normed hidden ``h [B, T, d]`` → rotated q ``[B,T,H,hd]``, rotated k and v ``[B,T,K,hd]``
    (``cpu_grad``: see ``models.dense``)."""
    dt = h.dtype
    q = dense("btd,dnh->btnh", h, layer["q_proj"].astype(dt), cpu_grad=cpu_grad)
    k = dense("btd,dnh->btnh", h, layer["k_proj"].astype(dt), cpu_grad=cpu_grad)
    v = dense("btd,dnh->btnh", h, layer["v_proj"].astype(dt), cpu_grad=cpu_grad)
    if config.qkv_bias:
        q = q + layer["q_bias"].astype(dt)
        k = k + layer["k_bias"].astype(dt)
        v = v + layer["v_bias"].astype(dt)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attend(q, k, v, mask, kv_layout: str = "bskh"):
    """Grouped-query attention.

    q ``[B, T, H, hd]``, k/v ``[B, S, K, hd]`` (``kv_layout="bskh"``, training) or
    ``[B, K, S, hd]`` (``"bksh"``, the KV cache's layout), mask ``[B, T, S]`` bool (True =
    may attend) → ``[B, T, H, hd]`` in q.dtype. Scores and softmax in fp32.
    """
    b, t, n_q, hd = q.shape
    n_kv = k.shape[kv_layout.index("k")]
    qg = q.reshape(b, t, n_kv, n_q // n_kv, hd)
    scores = jnp.einsum(
        f"btkgh,{kv_layout}->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32
    )
    scores = scores * (hd**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum(f"bkgts,{kv_layout}->btkgh", probs, v.astype(q.dtype))
    return out.reshape(b, t, n_q, hd)


def attn_out_and_mlp(
    layer, config: ModelConfig, x, attn, act=None, flat_heads: bool = False, cpu_grad: bool = False
):
    """Residual stream after the attention output projection and the SwiGLU MLP; ``act``:
    optional ``(x, *logical_axes) -> x`` sharding constraint for the MLP activations.
    ``flat_heads``: contract one ``H·hd`` axis (a free reshape of ``o_proj``) instead of the
    (head, head_dim) pair, so XLA reorders the small activation, never a copy of the weight
    (the decode path; same sum up to the order of its terms)."""
    dt = x.dtype
    if flat_heads:
        b, t, n, hd = attn.shape
        o = layer["o_proj"].astype(dt).reshape(n * hd, -1)
        x = x + jnp.einsum("btf,fd->btd", attn.reshape(b, t, n * hd), o)
    else:
        x = x + dense("btnh,nhd->btd", attn, layer["o_proj"].astype(dt), 2, cpu_grad=cpu_grad)
    h = rms_norm(x, layer["mlp_norm"], config.rms_norm_eps)
    gate = dense("btd,df->btf", h, layer["gate_proj"].astype(dt), cpu_grad=cpu_grad)
    up = dense("btd,df->btf", h, layer["up_proj"].astype(dt), cpu_grad=cpu_grad)
    if act is not None:
        gate, up = act(gate, "batch", "seq", "mlp"), act(up, "batch", "seq", "mlp")
    down = layer["down_proj"].astype(dt)
    return x + dense("btf,fd->btd", jax.nn.silu(gate) * up, down, cpu_grad=cpu_grad)


def default_positions(attention_mask):
    """``cumsum(mask) - 1`` clipped at 0: the first real token of each row is position 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _resolve_dtype(params, compute_dtype):
    return jnp.dtype(compute_dtype) if compute_dtype is not None else params["embed"].dtype


def embed(params, tokens, dtype):
    """Token ids ``[B, T]`` → embeddings ``[B, T, d]`` in ``dtype``."""
    return jnp.take(params["embed"], tokens, axis=0).astype(dtype)


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """How the forward pass is built and placed: ``remat`` (bool or a name in
    :data:`REMAT_POLICIES`), ``attention_impl`` (see the module docstring) and the activation
    sharding constraints ``mesh`` / ``rules`` (none without a mesh)."""

    remat: Any = False
    attention_impl: str = "xla"
    mesh: Any = None
    rules: Any = dataclasses.field(default_factory=lambda: DEFAULT_RULES)


def forward_hidden(
    params,
    config: ModelConfig,
    tokens,
    attention_mask=None,
    positions=None,
    *,
    compute_dtype=None,
    options: ForwardOptions = ForwardOptions(),
):
    """Final-normed hidden states ``[B, T, d]`` in the compute dtype.

    tokens ``[B, T]`` int; attention_mask ``[B, T]`` (1/True = real token, default all ones);
    positions ``[B, T]`` int (default ``cumsum(mask) - 1`` clipped at 0, so left padding works).
    A query at index i attends to keys j ≤ i with ``attention_mask[b, j]``. ``options``:
    rematerialisation, attention implementation and activation sharding
    (:class:`ForwardOptions`).
    """
    remat, attention_impl = options.remat, options.attention_impl
    mesh, rules = options.mesh, options.rules
    dtype = _resolve_dtype(params, compute_dtype)
    tokens = jnp.asarray(tokens, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.bool_)
    attention_mask = jnp.asarray(attention_mask).astype(jnp.bool_)
    if positions is None:
        positions = default_positions(attention_mask)
    cos, sin = rope_tables(config, positions)
    act = lambda x, *axes: constrain(x, axes, mesh, rules)  # noqa: E731
    rows = ("batch", "seq", None)
    cpu_grad = cpu_grad_applies(mesh)

    def layer_fn(x, layer):
        x = act(x, *rows)
        h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
        q, k, v = project_qkv(layer, config, h, cos, sin, cpu_grad)
        q = act(q, "batch", "seq", "q_heads", None)
        k = act(k, "batch", "seq", "kv_heads", None)
        v = act(v, "batch", "seq", "kv_heads", None)
        attn = causal_attention(q, k, v, attention_mask, impl=attention_impl)
        attn = checkpoint_name(act(attn, "batch", "seq", "q_heads", None), "attn_out")
        return act(attn_out_and_mlp(layer, config, x, attn, act, cpu_grad=cpu_grad), *rows), None

    layer_fn = _checkpointed(layer_fn, remat_policy(remat))
    # The lookup reads the table whole (gathered like any FSDP weight): a lookup into a table
    # split on the hidden dim would otherwise all-reduce [rows, T, d] activations.
    table = act(params["embed"], None, None)
    x0 = act(jnp.take(table, tokens, axis=0).astype(dtype), *rows)
    x, _ = jax.lax.scan(layer_fn, x0, params["layers"])
    return rms_norm(x, params["final_norm"], config.rms_norm_eps)


def unembedding(params, config: ModelConfig):
    """The output projection ``[d, V]``: ``lm_head``, or the tied embedding transposed."""
    if config.tie_word_embeddings:
        return params["embed"].T
    return params["lm_head"]


def logits_from_hidden(params, config: ModelConfig, hidden):
    """fp32 logits ``[..., V]`` from hidden states ``[..., d]``."""
    return jnp.einsum(
        "...d,dv->...v", hidden.astype(jnp.float32), unembedding(params, config).astype(jnp.float32)
    )


def forward(
    params,
    config: ModelConfig,
    tokens,
    attention_mask=None,
    positions=None,
    *,
    compute_dtype=None,
    remat=False,
    attention_impl: str = "xla",
):
    """Logits ``[B, T, V]`` float32; arguments as for :func:`forward_hidden`."""
    hidden = forward_hidden(
        params,
        config,
        tokens,
        attention_mask,
        positions,
        compute_dtype=compute_dtype,
        options=ForwardOptions(remat=remat, attention_impl=attention_impl),
    )
    return logits_from_hidden(params, config, hidden)
