"""The game's training losses (GAME_SPEC §2.10–2.11) as pure, masked, per-item functions.

Every loss here returns one value per item (pair or sample); none of them averages over the
batch. Normalisation by the GLOBAL number of items (across devices and microbatches, so that
the gradient is a mean over the whole batch whatever its split) is done once in the update
step, with :func:`normalised_sum`. Padded items are dropped there by their ``valid`` flag.

Conventions: ``P`` pairs, ``S`` samples, ``T`` padded completion length. ``token_logps`` are
the per-token log-probs of the realised next tokens (from ``advgame_jax.ops.logprobs``),
aligned with ``loss_mask`` (True on completion tokens only). Masked positions may hold any
value, even ``inf``/``NaN``: they are replaced before any arithmetic, so neither values nor
gradients can leak from them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

__all__ = [
    "sequence_logprobs",
    "dpo_loss",
    "ipo_loss",
    "nll_loss",
    "entropy_bonus",
    "grpo_loss",
    "normalised_sum",
]


def _masked(x, mask):
    # Double-where: zeroing the input (not just the output) keeps masked garbage out of grads.
    return jnp.where(mask, x.astype(jnp.float32), 0.0)


def _masked_total(x, mask, length_normalization):
    mask = mask.astype(bool)
    total = jnp.sum(_masked(x, mask), axis=-1)
    if length_normalization:
        total = total / jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(jnp.float32)
    return total


def sequence_logprobs(token_logps, loss_mask, *, length_normalization=False):
    """log π(completion) per item: ``[P, T]`` token log-probs, ``[P, T]`` bool mask -> ``[P]``.

    Sum over masked-in tokens, or their mean when ``length_normalization`` (an item with no
    token gives 0).
    """
    return _masked_total(token_logps, loss_mask, length_normalization)


def _margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected):
    """Δ_chosen − Δ_rejected with Δ = log π_θ − log π_ref; the reference gets no gradient."""
    ref_chosen = jax.lax.stop_gradient(ref_chosen)
    ref_rejected = jax.lax.stop_gradient(ref_rejected)
    return (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, *, beta):
    """DPO per pair: −log σ(β (Δ_chosen − Δ_rejected)); inputs ``[P]`` sequence log-probs
    (:func:`sequence_logprobs`) -> ``[P]``. ``log_sigmoid`` keeps large margins finite."""
    return -jax.nn.log_sigmoid(beta * _margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected))


def ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, *, beta):
    """IPO per pair: (Δ_chosen − Δ_rejected − 1/(2β))²; inputs ``[P]`` -> ``[P]``."""
    margin = _margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
    return jnp.square(margin - 1.0 / (2.0 * beta))


def nll_loss(token_logps, loss_mask, *, length_normalization=False):
    """Negative log-likelihood per item (applied to the chosen completions): ``[P, T]`` ->
    ``[P]``, summed over completion tokens or their mean with ``length_normalization``."""
    return -_masked_total(token_logps, loss_mask, length_normalization)


def entropy_bonus(token_entropy, loss_mask, *, length_normalization=False):
    """Policy entropy per item: ``[P, T]`` per-token softmax entropies -> ``[P]`` (sum, or
    mean with ``length_normalization``). A bonus: the total loss SUBTRACTS coef × this."""
    return _masked_total(token_entropy, loss_mask, length_normalization)


@dataclasses.dataclass(frozen=True)
class ImportanceWeighting:
    """Truncated importance sampling of GRPO's policy term (see :func:`grpo_loss`):
    ``sampler_token_logps`` ``[S, T]`` (log-probs of the realised tokens under the sampler),
    the cap ``tis_cap`` on the weight, ``detach_weight`` (False: the weight keeps its
    gradient, the reference's behaviour) and ``sampler_rows`` (``[S]`` bool, optional: rows
    without sampler log-probs, False, get weight 1)."""

    sampler_token_logps: Any
    tis_cap: float = 2.0
    detach_weight: bool = True
    sampler_rows: Any = None


def _importance_weights(lp, lp_sg, mask, iw: Optional[ImportanceWeighting]):
    """Per-token weights ``[S, T]``: ``min(exp(lp − sampler), cap)`` or ones."""
    if iw is None:
        return jnp.ones_like(lp)
    sampler = jax.lax.stop_gradient(_masked(iw.sampler_token_logps, mask))
    # min(exp(r), cap) computed as exp(min(r, log cap)): the same value, but a stale
    # sampler can neither overflow exp nor send 0·inf = NaN into the gradient.
    log_w = (lp_sg if iw.detach_weight else lp) - sampler
    w = jnp.exp(jnp.minimum(log_w, jnp.log(jnp.float32(iw.tis_cap))))
    if iw.sampler_rows is not None:
        w = jnp.where(jnp.asarray(iw.sampler_rows, bool)[:, None], w, 1.0)
    return w


def grpo_loss(
    token_logps,
    ref_token_logps,
    advantages,
    loss_mask,
    *,
    kl_coef=0.1,
    importance: Optional[ImportanceWeighting] = None,
):
    """GRPO per sample (GAME_SPEC §2.11): summed per-token policy gradient + k3 KL penalty.

    Shapes: token_logps, ref_token_logps, loss_mask ``[S, T]``; advantages ``[S]`` (patched
    reward − baseline, no std scaling) -> ``[S]``. ``importance``: the sampler's log-probs
    and how they weight the policy term (:class:`ImportanceWeighting`; None: w_t = 1).

    Per completion token t (lp = log π_θ, ref = log π_ref, both of the realised token):

        w_t    = min(exp(sg(lp_t) − sampler_t), tis_cap)   (1 without sampler log-probs)
        pg_t   = −w_t · A · exp(lp_t − sg(lp_t))           (value −w_t·A, gradient −w_t·A·∇lp_t)

    ``detach_weight=False`` (the reference implementation's behaviour, paper GRPO configs):
    w_t = min(exp(lp_t − sampler_t), tis_cap) keeps its gradient, so where w_t < tis_cap the
    gradient of pg_t is −2·w_t·A·∇lp_t (one factor from w, one from the policy term); where the
    cap binds, the cap has no gradient and it is −w_t·A·∇lp_t as before. ``sampler_rows``
    (``[S]`` bool, optional): samples without sampler log-probs (False) get w_t = 1 with no
    gradient in either mode.
        k3_t   = exp(ref_t − lp_t) − (ref_t − lp_t) − 1    (k3 estimator of KL(π_θ ‖ π_ref))
        loss_t = pg_t + kl_coef · k3_t

    (sg = stop_gradient). No PPO ratio clipping: samples are used for one update. The
    per-sample loss is the SUM over its completion tokens; the update step divides the sum
    over valid samples by the global number of samples (a mean over samples, so longer
    completions weigh more, as in the sequence-level sums of DPO/IPO). The common alternative,
    dividing by the global number of completion tokens (a per-token mean, as in DAPO), would
    be a different normaliser passed to :func:`normalised_sum`; it is not the default.
    """
    mask = loss_mask.astype(bool)
    lp = _masked(token_logps, mask)
    ref = jax.lax.stop_gradient(_masked(ref_token_logps, mask))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))[:, None]
    lp_sg = jax.lax.stop_gradient(lp)
    w = _importance_weights(lp, lp_sg, mask, importance)
    pg = -w * adv * jnp.exp(lp - lp_sg)
    log_ratio = ref - lp
    k3 = jnp.exp(log_ratio) - log_ratio - 1.0
    per_token = pg + kl_coef * k3
    return jnp.sum(jnp.where(mask, per_token, 0.0), axis=-1)


def normalised_sum(per_item, valid, global_count):
    """sum(valid · per_item) / max(global_count, 1): ``[P]``, ``[P]`` bool, scalar -> scalar.

    ``global_count`` is the number of valid items in the GLOBAL batch (all devices and
    microbatches), so summing this over microbatches gives the global mean. Zero valid items
    give exactly 0 with zero (finite) gradients.
    """
    total = jnp.sum(_masked(per_item, valid.astype(bool)))
    return total / jnp.maximum(jnp.asarray(global_count, jnp.float32), 1.0)
