"""The sharded, jitted update step of one player (GAME_SPEC §2.11–2.12): DPO, IPO or GRPO
loss on a collated batch, gradient accumulation over microbatches, AdamW, one optimizer
update.

Numerics: fp32 master params are cast to ``compute_dtype`` inside the loss, so gradients
arrive in fp32; per-token log-probs come from ``forward_hidden`` + ``unembedding`` +
``token_logprobs`` (never a [tokens, vocab] array) and every reduction is fp32. The reference
log-probs use ``reference_params(state)`` (θ̄ or θ₀) under ``stop_gradient``.

Normalisation: per-pair (per-sample) losses are summed and divided by the number of valid
rows of the WHOLE batch (all microbatches, all devices), so the gradient is a true mean over
pairs. A batch without a valid row changes nothing: params, optimizer state and ``step`` are
kept (selected with ``where``, so AdamW's weight decay does not move either) and no NaN
appears. The same ``where`` skips an update whose loss or gradient is not finite (metric
``skipped_nonfinite``).

Sharding: with a ``mesh``, the state is laid out by ``training.sharding.state_shardings``
(params by the model's logical rules) and the batch rows over the ``batch`` logical axis;
the jitted function is compiled per state structure with those in/out shardings and donates
the state.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from advgame_jax import losses
from advgame_jax.models import DEFAULT_RULES, ModelConfig, forward_hidden, unembedding
from advgame_jax.ops.logprobs import token_logprobs, token_logprobs_and_entropy
from advgame_jax.training.batching import PairBatch, SampleBatch
from advgame_jax.training.optimizer import current_lr
from advgame_jax.training.sharding import batch_parallel_size, state_shardings
from advgame_jax.training.state import PlayerState, reference_params

LOSSES = ("dpo", "ipo", "grpo")


def _shift(x, fill):
    """Align a per-token array [R, T] with the positions that predict it: out[:, t] = x[:, t+1]."""
    pad = jnp.full(x.shape[:-1] + (1,), fill, x.dtype)
    return jnp.concatenate([x[..., 1:], pad], axis=-1)


def sequence_token_logprobs(params, config: ModelConfig, tokens, attention_mask, positions, *,
                            compute_dtype, chunk_size: int, remat: bool, with_entropy: bool = False):
    """Log-prob of each next token ``[R, T]`` fp32 (column t scores ``tokens[:, t+1]``; the
    last column scores a dummy target) and, if asked, the next-token entropy ``[R, T]``."""
    p = jax.tree.map(lambda x: x.astype(compute_dtype), params)
    hidden = forward_hidden(p, config, tokens, attention_mask, positions,
                            compute_dtype=compute_dtype, remat=remat)
    r, t, d = hidden.shape
    targets = _shift(tokens, 0).reshape(r * t)
    unembed = unembedding(p, config)
    if with_entropy:
        lp, ent = token_logprobs_and_entropy(hidden.reshape(r * t, d), unembed, targets,
                                             chunk_size=chunk_size)
        return lp.reshape(r, t), ent.reshape(r, t)
    return token_logprobs(hidden.reshape(r * t, d), unembed, targets,
                          chunk_size=chunk_size).reshape(r, t), None


def _split_microbatches(batch, m: int, mb_sharding):
    """[R, ...] → [m, R/m, ...] taking rows i ≡ k (mod m) into microbatch k, so each
    microbatch keeps the batch's even split over devices (no resharding)."""
    def split(x):
        r = x.shape[0]
        y = jnp.swapaxes(x.reshape((r // m, m) + x.shape[1:]), 0, 1)
        if mb_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, mb_sharding)
        return y
    return jax.tree.map(split, batch)


def make_update_step(model_config: ModelConfig, *, optimizer: optax.GradientTransformation,
                     loss: str = "dpo", beta: float = 0.1, length_normalization: bool = False,
                     nll_coef: float = 0.0, entropy_coef: float = 0.0, kl_coef: float = 0.1,
                     tis_cap: Optional[float] = 2.0, num_microbatches: int = 1,
                     compute_dtype=jnp.bfloat16, chunk_size: int = 1024, remat: bool = True,
                     mesh=None, rules=DEFAULT_RULES, step_on_empty: bool = False,
                     tis_detach: bool = True) -> "UpdateStep":
    """Build ``update(state, batch) -> (state, metrics)`` for one player.

    loss: 'dpo' | 'ipo' (batch: :class:`PairBatch`) or 'grpo' (:class:`SampleBatch`).
    beta: DPO/IPO β. nll_coef: NLL on the chosen completion. entropy_coef: bonus on the mean
    of the chosen and rejected completions' entropies (DPO/IPO) or the samples' (GRPO), which
    the loss subtracts. kl_coef, tis_cap (None or ≤ 0: no importance weighting): GRPO.
    ``optimizer`` must be the transformation that built ``state.opt_state``.
    Batch rows must be a multiple of ``num_microbatches × batch_parallel_size(mesh)``
    (``collate_*`` guarantees it when given the same numbers).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss.kind must be one of {LOSSES}, got {loss!r}")
    if num_microbatches < 1:
        raise ValueError(f"train.num_microbatches must be ≥ 1, got {num_microbatches!r}")
    tis = tis_cap if tis_cap is not None and tis_cap > 0 else None
    fwd = dict(compute_dtype=compute_dtype, chunk_size=chunk_size, remat=remat)
    ent_on = entropy_coef != 0.0

    def pair_loss(params, ref, mb: PairBatch, n_valid):
        p, two, t = mb.tokens.shape
        rows = lambda x: x.reshape(p * two, t)  # noqa: E731
        args = (rows(mb.tokens), rows(mb.attention_mask), rows(mb.positions))
        lp, ent = sequence_token_logprobs(params, model_config, *args, with_entropy=ent_on, **fwd)
        ref_lp, _ = sequence_token_logprobs(ref, model_config, *args, **dict(fwd, remat=False))
        ref_lp = jax.lax.stop_gradient(ref_lp)
        lmask = _shift(rows(mb.loss_mask), False)
        seq = losses.sequence_logprobs(lp, lmask, length_normalization=length_normalization)
        ref_seq = losses.sequence_logprobs(ref_lp, lmask, length_normalization=length_normalization)
        seq, ref_seq = seq.reshape(p, 2), ref_seq.reshape(p, 2)
        fn = losses.dpo_loss if loss == "dpo" else losses.ipo_loss
        per_pair = fn(seq[:, 0], seq[:, 1], ref_seq[:, 0], ref_seq[:, 1], beta=beta)
        if nll_coef:
            per_pair = per_pair + nll_coef * losses.nll_loss(
                lp.reshape(p, 2, t)[:, 0], lmask.reshape(p, 2, t)[:, 0],
                length_normalization=length_normalization)
        if ent_on:
            bonus = losses.entropy_bonus(ent, lmask, length_normalization=length_normalization)
            per_pair = per_pair - entropy_coef * bonus.reshape(p, 2).mean(axis=1)
        valid = mb.pair_valid
        objective = losses.normalised_sum(per_pair, valid, n_valid)
        per_pair = jnp.where(valid, per_pair, 0.0)
        d_c = seq[:, 0] - ref_seq[:, 0]
        d_r = seq[:, 1] - ref_seq[:, 1]
        z = jnp.zeros_like(d_c)
        sums = {
            "loss": jnp.sum(per_pair),
            "margin": jnp.sum(jnp.where(valid, d_c - d_r, z)),
            "chosen_reward": jnp.sum(jnp.where(valid, beta * d_c, z)),
            "rejected_reward": jnp.sum(jnp.where(valid, beta * d_r, z)),
            "accuracy": jnp.sum(jnp.where(valid & (d_c > d_r), 1.0, z)),
        }
        return objective, sums

    def sample_loss(params, ref, mb: SampleBatch, n_valid):
        args = (mb.tokens, mb.attention_mask, mb.positions)
        lp, ent = sequence_token_logprobs(params, model_config, *args, with_entropy=ent_on, **fwd)
        ref_lp, _ = sequence_token_logprobs(ref, model_config, *args, **dict(fwd, remat=False))
        ref_lp = jax.lax.stop_gradient(ref_lp)
        lmask = _shift(mb.loss_mask, False)
        sampler_lp = None
        if tis is not None:
            # Rows without sampler log-probs get ratio 1 (no correction) rather than garbage.
            sampler_lp = jnp.where(mb.has_sampler_logprobs[:, None],
                                   _shift(mb.sampler_logprobs, 0.0), jax.lax.stop_gradient(lp))
        per = losses.grpo_loss(lp, ref_lp, mb.advantages, lmask, kl_coef=kl_coef,
                               sampler_token_logps=sampler_lp, detach_weight=tis_detach,
                               sampler_rows=mb.has_sampler_logprobs,
                               tis_cap=tis if tis is not None else 2.0)
        if nll_coef:
            per = per + nll_coef * losses.nll_loss(lp, lmask, length_normalization=length_normalization)
        if ent_on:
            per = per - entropy_coef * losses.entropy_bonus(ent, lmask,
                                                            length_normalization=length_normalization)
        valid = mb.sample_valid
        objective = losses.normalised_sum(per, valid, n_valid)
        per = jnp.where(valid, per, 0.0)
        tok = lmask & valid[:, None]
        log_ratio = jax.lax.stop_gradient(ref_lp - lp)
        k3 = jnp.where(tok, jnp.exp(log_ratio) - log_ratio - 1.0, 0.0)
        sums = {
            "loss": jnp.sum(per),
            "advantage": jnp.sum(jnp.where(valid, mb.advantages, 0.0)),
            "kl_k3_tokens": jnp.sum(k3),
            "num_tokens": jnp.sum(tok.astype(jnp.float32)),
        }
        return objective, sums

    per_batch_loss = sample_loss if loss == "grpo" else pair_loss
    grad_fn = jax.value_and_grad(per_batch_loss, has_aux=True)

    def update(state: PlayerState, batch, mb_sharding, param_spec):
        params = state.params
        ref = jax.lax.stop_gradient(reference_params(state))
        valid = batch.sample_valid if loss == "grpo" else batch.pair_valid
        n_valid = jnp.sum(valid.astype(jnp.float32))
        denom = jnp.maximum(n_valid, 1.0)

        if num_microbatches == 1:
            (_, sums), grads = grad_fn(params, ref, batch, n_valid)
        else:
            mbs = _split_microbatches(batch, num_microbatches, mb_sharding)

            def body(carry, mb):
                g_acc, s_acc = carry
                (_, s), g = grad_fn(params, ref, mb, n_valid)
                g_acc = jax.tree.map(jnp.add, g_acc, g)
                if param_spec is not None:
                    g_acc = jax.lax.with_sharding_constraint(g_acc, param_spec)
                return (g_acc, jax.tree.map(jnp.add, s_acc, s)), None

            zeros_g = jax.tree.map(jnp.zeros_like, params)
            zeros_s = jax.eval_shape(lambda: grad_fn(params, ref, jax.tree.map(lambda x: x[0], mbs),
                                                     n_valid)[0][1])
            zeros_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros_s)
            (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), mbs)

        grad_norm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient (e.g. from corrupted inputs) skips the update like an
        # empty batch does, so it can never reach the params or a checkpoint.
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(sums["loss"])
        apply = ((n_valid > 0) | step_on_empty) & finite
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)  # noqa: E731
        new_state = state.replace(params=keep(new_params, params),
                                  opt_state=keep(new_opt, state.opt_state),
                                  step=state.step + apply.astype(state.step.dtype))
        metrics = {k: v / denom for k, v in sums.items() if k not in ("kl_k3_tokens", "num_tokens")}
        if loss == "grpo":
            metrics["kl_k3"] = sums["kl_k3_tokens"] / jnp.maximum(sums["num_tokens"], 1.0)
            metrics["num_samples"] = n_valid
            metrics["num_tokens"] = sums["num_tokens"]
        else:
            metrics["num_pairs"] = n_valid
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = current_lr(new_state.opt_state)
        metrics["applied"] = apply.astype(jnp.float32)
        metrics["skipped_nonfinite"] = ((n_valid > 0) & ~finite).astype(jnp.float32)
        return new_state, metrics

    return UpdateStep(update, model_config, mesh, rules, num_microbatches)


class UpdateStep:
    """Callable ``update(state, batch) -> (state, metrics)``; ``state`` is donated.

    ``batch`` may be numpy (from ``collate_*``) or already-sharded arrays. ``metrics`` is a
    dict of fp32 scalars: loss, and for DPO/IPO margin (mean Δ_chosen − Δ_rejected),
    chosen_reward / rejected_reward (mean β·Δ), accuracy (fraction with Δ_c > Δ_r), num_pairs;
    for GRPO advantage, kl_k3, num_samples, num_tokens; always grad_norm (before clipping),
    lr (of this update), applied (0 when the batch had no valid row or was skipped) and
    skipped_nonfinite (1 when a non-finite loss or gradient skipped the update). A frozen player
    returns its state unchanged and ``{}`` without running anything.
    """

    def __init__(self, fn: Callable, config: ModelConfig, mesh, rules, num_microbatches: int):
        self._fn = fn
        self._config = config
        self._mesh = mesh
        self._rules = rules
        self._m = num_microbatches
        self._jitted: dict = {}

    @property
    def data_parallel_size(self) -> int:
        """Devices the batch rows are split over; pass it to ``collate_*``."""
        return batch_parallel_size(self._mesh, self._rules)

    def _compiled_for(self, state: PlayerState):
        key = jax.tree.structure(state)
        if key in self._jitted:
            return self._jitted[key]
        mesh = self._mesh
        if mesh is None:
            fn = jax.jit(lambda s, b: self._fn(s, b, None, None), donate_argnums=0)
        else:
            s_sh = state_shardings(state, self._config, mesh, self._rules)
            target = self._rules.get("batch")
            target = (target,) if isinstance(target, str) else tuple(target or ())
            axes = tuple(a for a in target if a in mesh.shape and mesh.shape[a] > 1)
            batch_axes = axes if len(axes) != 1 else axes[0]
            rows = NamedSharding(mesh, PartitionSpec(batch_axes or None))
            mb_rows = NamedSharding(mesh, PartitionSpec(None, batch_axes or None))
            fn = jax.jit(lambda s, b: self._fn(s, b, mb_rows, s_sh.params),
                         in_shardings=(s_sh, rows),
                         out_shardings=(s_sh, NamedSharding(mesh, PartitionSpec())),
                         donate_argnums=0)
        self._jitted[key] = fn
        return fn

    def __call__(self, state: PlayerState, batch):
        if not state.trainable:
            return state, {}
        rows = batch.tokens.shape[0]
        need = self._m * self.data_parallel_size
        if rows % need:
            raise ValueError(f"batch has {rows} rows, not a multiple of num_microbatches × "
                             f"data-parallel size = {need}; collate with the same numbers")
        if self._mesh is None:
            # Commit state and batch to the params' device (no copy when already there), so a
            # fresh, uncommitted state does not compile a second program.
            device = next(iter(jax.tree.leaves(state.params)[0].devices()))
            state = jax.device_put(state, device)
            batch = jax.device_put(batch, device)
        return self._compiled_for(state)(state, batch)

    def lower(self, state: PlayerState, batch):
        """``jax.jit(...).lower`` of the step for ``state``'s structure (cost analysis, HLO)."""
        return self._compiled_for(state).lower(state, batch)

    def cache_size(self) -> int:
        """Number of compiled variants held (for recompilation checks)."""
        return sum(f._cache_size() for f in self._jitted.values())
