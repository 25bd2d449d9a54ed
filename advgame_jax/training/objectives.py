"""The registry of update objectives (GAME_SPEC §2.11): free functions from the policy's and
the reference's per-token log-probs to per-row losses and metric sums.

Each objective has the signature ``(lp, ref_lp, ent, lmask, batch, hp) -> (per_row, sums)``:
``lp`` / ``ref_lp`` / ``ent`` ``[rows, T]`` fp32 over the batch's sequences (pairs flattened
to ``2P`` rows, chosen first), ``lmask`` the shifted loss mask, ``batch`` the (micro)batch,
``hp`` the :class:`LossHParams`. ``per_row`` is one loss per pair / sample (the update step
weights and sums it); ``sums`` are metric sums over VALID rows (the step divides them).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from advgame_jax import losses


@dataclasses.dataclass(frozen=True)
class LossHParams:
    """Loss hyperparameters (config.loss). tis_cap None: no importance weighting (GRPO)."""

    beta: float = 0.1
    length_normalization: bool = False
    nll_coef: float = 0.0
    entropy_coef: float = 0.0
    kl_coef: float = 0.1
    tis_cap: Optional[float] = 2.0
    tis_detach: bool = True


def _preference(fn: Callable):
    def objective(lp, ref_lp, ent, lmask, mb, hp: LossHParams):
        p, _, t = mb.tokens.shape
        ln = hp.length_normalization
        seq = losses.sequence_logprobs(lp, lmask, length_normalization=ln).reshape(p, 2)
        ref_seq = losses.sequence_logprobs(ref_lp, lmask, length_normalization=ln).reshape(p, 2)
        per = fn(seq[:, 0], seq[:, 1], ref_seq[:, 0], ref_seq[:, 1], beta=hp.beta)
        if hp.nll_coef:
            per = per + hp.nll_coef * losses.nll_loss(
                lp.reshape(p, 2, t)[:, 0], lmask.reshape(p, 2, t)[:, 0], length_normalization=ln
            )
        if hp.entropy_coef:
            bonus = losses.entropy_bonus(ent, lmask, length_normalization=ln)
            per = per - hp.entropy_coef * bonus.reshape(p, 2).mean(axis=1)
        valid = mb.pair_valid
        d_c, d_r = seq[:, 0] - ref_seq[:, 0], seq[:, 1] - ref_seq[:, 1]
        on = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731
        sums = {
            "loss": on(per),
            "margin": on(d_c - d_r),
            "chosen_reward": on(hp.beta * d_c),
            "rejected_reward": on(hp.beta * d_r),
            "accuracy": on((d_c > d_r).astype(jnp.float32)),
        }
        return per, sums

    return objective


def grpo_objective(lp, ref_lp, ent, lmask, mb, hp: LossHParams):
    """Per-sample GRPO loss (policy gradient + k3 KL, optional truncated IS)."""
    tis = hp.tis_cap if hp.tis_cap is not None and hp.tis_cap > 0 else None
    importance = None
    if tis is not None:
        # Rows without sampler log-probs get ratio 1 (no correction) rather than garbage.
        shifted = jnp.concatenate(
            [mb.sampler_logprobs[:, 1:], jnp.zeros_like(mb.sampler_logprobs[:, :1])], axis=-1
        )
        sampler_lp = jnp.where(mb.has_sampler_logprobs[:, None], shifted, jax.lax.stop_gradient(lp))
        importance = losses.ImportanceWeighting(
            sampler_lp,
            tis_cap=tis,
            detach_weight=hp.tis_detach,
            sampler_rows=mb.has_sampler_logprobs,
        )
    per = losses.grpo_loss(
        lp, ref_lp, mb.advantages, lmask, kl_coef=hp.kl_coef, importance=importance
    )
    ln = hp.length_normalization
    if hp.nll_coef:
        per = per + hp.nll_coef * losses.nll_loss(lp, lmask, length_normalization=ln)
    if hp.entropy_coef:
        per = per - hp.entropy_coef * losses.entropy_bonus(ent, lmask, length_normalization=ln)
    valid = mb.sample_valid
    tok = lmask & valid[:, None]
    log_ratio = jax.lax.stop_gradient(ref_lp - lp)
    k3 = jnp.where(tok, jnp.exp(log_ratio) - log_ratio - 1.0, 0.0)
    sums = {
        "loss": jnp.sum(jnp.where(valid, per, 0.0)),
        "advantage": jnp.sum(jnp.where(valid, mb.advantages, 0.0)),
        "kl_k3_tokens": jnp.sum(k3),
        "num_tokens": jnp.sum(tok.astype(jnp.float32)),
    }
    return per, sums


# name -> (objective, batch kind)
OBJECTIVES: dict[str, tuple[Callable, str]] = {
    "dpo": (_preference(losses.dpo_loss), "pairs"),
    "ipo": (_preference(losses.ipo_loss), "pairs"),
    "grpo": (grpo_objective, "samples"),
}
