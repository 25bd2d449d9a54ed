"""Shared tiny fixtures for the training tests (no tests here): a tiny Llama config, fixed
preference pairs, cached update steps (one compilation per variant for the whole session)
and independent numpy/JAX references (full-logit log-probs, a numpy AdamW)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from advgame_jax.models import ModelConfig, forward, init_params, make_mesh
from advgame_jax.training import make_optimizer, make_update_step
from advgame_jax.training.update import LossSettings, StepSettings
from advgame_jax.types import TokenPair, TokenSample

CFG = ModelConfig(
    model_type="llama",
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
PAD = 0
LR = 1e-3
NUM_STEPS = 20
# Every pair batch of these tests collates to [8, 2, 16]: one shape, one compilation.
BUCKETS = dict(pair_buckets=(8,), length_buckets=(16,))


def init(seed: int = 0):
    return init_params(CFG, jax.random.key(seed))


def host(tree):
    """A numpy copy of a pytree (typed PRNG keys become their key data)."""

    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x, copy=True)

    return jax.tree.map(one, tree)


def optimizer(lr: float = LR, weight_decay: float = 0.1):
    return make_optimizer(lr, num_steps=NUM_STEPS, weight_decay=weight_decay)


def fixed_pairs(n: int = 6, seed: int = 0) -> list[TokenPair]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = tuple(int(t) for t in rng.integers(1, CFG.vocab_size, rng.integers(3, 7)))
        c = tuple(int(t) for t in rng.integers(1, CFG.vocab_size, rng.integers(2, 8)))
        r = tuple(int(t) for t in rng.integers(1, CFG.vocab_size, rng.integers(2, 8)))
        out.append(TokenPair(prompt, c, r))
    return out


def fixed_samples(seed: int = 1) -> list[TokenSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i, adv in enumerate((1.0, -1.0, 0.5, -0.5)):
        prompt = tuple(int(t) for t in rng.integers(1, CFG.vocab_size, 4))
        comp = tuple(int(t) for t in rng.integers(1, CFG.vocab_size, 5))
        slp = None if i == 3 else tuple(float(x) for x in -rng.uniform(4.0, 6.0, 5))
        out.append(TokenSample(prompt, comp, adv, slp))
    return out


@functools.lru_cache(maxsize=None)
def update_step(
    loss: str = "dpo",
    num_microbatches: int = 1,
    mesh_shape=None,
    lr: float = LR,
    weight_decay: float = 0.1,
    compute_dtype=jnp.float32,
    remat: bool = False,
    nll_coef: float = 0.0,
    entropy_coef: float = 0.0,
):
    mesh = make_mesh(*mesh_shape) if mesh_shape else None
    return make_update_step(
        CFG,
        optimizer(lr, weight_decay),
        LossSettings(kind=loss, beta=0.1, nll_coef=nll_coef, entropy_coef=entropy_coef),
        StepSettings(
            num_microbatches=num_microbatches,
            compute_dtype=compute_dtype,
            chunk_size=64,
            remat=remat,
        ),
        mesh=mesh,
    )


@functools.lru_cache(maxsize=None)
def _jit_forward():
    return jax.jit(lambda p, t: forward(p, CFG, t, compute_dtype=jnp.float32))


def _completion_logp(params, prompt, completion):
    """[len(completion), V] float64 log-softmax rows predicting each completion token."""
    seq = list(prompt) + list(completion)
    # Right-padded to one length (one compilation); causal attention keeps it exact.
    tokens = np.array([seq + [PAD] * (16 - len(seq))], np.int32)
    logits = np.asarray(_jit_forward()(params, tokens), np.float64)[0]
    logp = (
        logits
        - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    n_p = len(prompt)
    return logp[n_p - 1 : n_p - 1 + len(completion)]


def seq_logprob(params, prompt, completion) -> float:
    """log π(completion | prompt) from full logits (no chunking, no masks, no losses module)."""
    rows = _completion_logp(params, prompt, completion)
    return float(sum(rows[i, tok] for i, tok in enumerate(completion)))


def seq_entropy(params, prompt, completion) -> float:
    """Sum over completion positions of the next-token entropy (full logits, numpy)."""
    rows = _completion_logp(params, prompt, completion)
    return float(-np.sum(np.exp(rows) * rows))


def numpy_adamw(params, grads, *, lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0):
    """First AdamW update (count 1) after global-norm clipping; no decay on *_norm leaves."""
    g_leaves = jax.tree.leaves(grads)
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in g_leaves))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0

    def one(path, p, g):
        p = np.asarray(p, np.float64)
        g = np.asarray(g, np.float64) * scale
        mu_hat = (1 - b1) * g / (1 - b1)
        nu_hat = (1 - b2) * g * g / (1 - b2)
        name = str(path[-1].key)
        wd = 0.0 if name.endswith("_norm") or name.endswith("_bias") else weight_decay
        return p - lr * (mu_hat / (np.sqrt(nu_hat) + eps) + wd * p)

    return jax.tree_util.tree_map_with_path(one, params, grads)


def max_abs_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
