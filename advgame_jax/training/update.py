"""The sharded, jitted update step of one player (GAME_SPEC §2.11–2.12): a registered objective
(``training.objectives``: DPO, IPO, GRPO) on a collated batch, gradient accumulation over
microbatches, AdamW, one optimizer update.

Numerics: master params (``state.params``, fp32 by default) are cast to ``compute_dtype``
inside the loss, so gradients arrive in the params' dtype; per-token log-probs come from
``forward_hidden`` + ``unembedding`` + the tiled log-prob kernel (never a [tokens, vocab]
array), run shard by shard (``ops.sharded_logprobs``); every reduction is fp32. The reference
log-probs use ``reference_params(state)`` (θ̄ or θ₀) under ``stop_gradient``.

Objective: ``Σ_i weight_i · loss_i`` over valid rows, with the batch's ``pair_weight`` /
``sample_weight`` (the game decides the normaliser; collate's default weights make it the
mean over the batch's rows). Reported metrics are plain means over valid rows. A microbatch
without a valid row skips the forward and backward passes (:func:`accumulate_microbatches`:
a ``lax.cond`` in the same program, so no extra compilation) and adds zero sums and zero
gradients. A batch without a valid row therefore costs no model pass; by default it changes
nothing (params, optimizer state and ``step`` are kept), with ``step_on_empty=True`` it still runs the optimizer update (AdamW
momentum decay, weight decay, learning-rate counter), as the reference does.
The optimizer update itself sits in a ``lax.cond`` (``_update_unless``) that also skips an
update whose loss or gradient is not finite (metric ``skipped_nonfinite``), so such an update
never reaches the params or a checkpoint.

Microbatching: :func:`accumulate_microbatches` wraps the gradient function; the number of
microbatches is ``num_microbatches`` or, with ``max_tokens_per_device``, the smallest split of
each device's rows whose microbatch holds at most that many tokens (decided from the batch
shape at trace time, so each length bucket gets its own split).

Sharding: with a ``mesh``, the state is constrained to ``training.sharding.state_shardings``
(params by the model's logical rules), batch rows to the logical ``batch`` axes, and the model
adds per-layer activation constraints; the step is one ``jax.jit`` (state donated) built here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from advgame_jax.models import (
    DEFAULT_RULES,
    ForwardOptions,
    ModelConfig,
    forward_hidden,
    param_shardings,
    unembedding,
)
from advgame_jax.models.attention import resolve_impl
from advgame_jax.models.transformer import remat_policy
from advgame_jax.ops.sharded_logprobs import sharded_sequence_logprobs
from advgame_jax.training.objectives import OBJECTIVES, LossHParams
from advgame_jax.training.optimizer import OptimizerSettings, current_lr
from advgame_jax.training.sharding import (
    batch_parallel_size,
    batch_shardings,
    shard_batch,
    state_shardings,
)
from advgame_jax.training.state import PlayerState, reference_params

LOSSES = tuple(OBJECTIVES)


def _shift(x, fill):
    """Align a per-token array [R, T] with the positions that predict it: out[:, t] = x[:, t+1]."""
    pad = jnp.full(x.shape[:-1] + (1,), fill, x.dtype)
    return jnp.concatenate([x[..., 1:], pad], axis=-1)


def sequence_token_logprobs(
    params,
    config: ModelConfig,
    rows,
    *,
    compute_dtype,
    chunk_size: int,
    options: ForwardOptions,
    with_entropy: bool = False,
):
    """Log-prob of each next token ``[R, T]`` fp32 (column t scores ``tokens[:, t+1]``; the
    last column scores a dummy target) and, if asked, the next-token entropy ``[R, T]``.
    ``rows``: ``(tokens, attention_mask, positions)``, each ``[R, T]``; ``options``: remat,
    attention implementation and sharding of the forward pass (``models.ForwardOptions``)."""
    tokens, attention_mask, positions = rows
    mesh, rules = options.mesh, options.rules
    p = jax.tree.map(lambda x: x.astype(compute_dtype), params)
    if mesh is not None:
        # Cast where the params live, so FSDP gathers compute-dtype weights (not fp32 ones).
        p = jax.lax.with_sharding_constraint(p, param_shardings(config, mesh, rules))
    hidden = forward_hidden(
        p, config, tokens, attention_mask, positions, compute_dtype=compute_dtype, options=options
    )
    # A tied head is the embedding table as stored ([V, d], sliced by rows): its transpose
    # would be a copy of the table per call on CPU.
    tied = config.tie_word_embeddings
    return sharded_sequence_logprobs(
        hidden,
        p["embed"] if tied else unembedding(p, config),
        _shift(tokens, 0),
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        mesh=mesh,
        rules=rules,
        vocab_major=tied,
    )


def microbatch_count(
    rows_per_device: int,
    tokens_per_row: int,
    *,
    num_microbatches: int = 1,
    max_tokens_per_device: Optional[int] = None,
) -> int:
    """Smallest divisor m ≥ ``num_microbatches`` of ``rows_per_device`` with
    ``rows_per_device / m × tokens_per_row ≤ max_tokens_per_device`` (one row per microbatch
    when even that is over budget); ``num_microbatches`` without a budget."""
    if not max_tokens_per_device:
        return num_microbatches
    for m in range(max(num_microbatches, 1), rows_per_device + 1):
        if (
            rows_per_device % m == 0
            and rows_per_device // m * tokens_per_row <= max_tokens_per_device
        ):
            return m
    return rows_per_device


def _split_microbatches(batch, m: int, mb_sharding, dp: int):
    """[R, ...] → [m, R/m, ...]: each device's block of rows is cut into ``m`` consecutive
    parts, and microbatch k takes part k of every block, so each microbatch keeps the batch's
    even split over devices (no resharding) and a device's trailing padding rows (collate puts
    them after the valid ones) fill its last microbatches, which then cost no model pass
    (:func:`accumulate_microbatches`). ``dp``: devices the rows are split over."""

    def split(x):
        r = x.shape[0]
        y = x.reshape((dp, m, r // (dp * m)) + x.shape[1:])
        y = jnp.swapaxes(y, 0, 1).reshape((m, r // m) + x.shape[1:])
        if mb_sharding is not None:
            spec = PartitionSpec(None, mb_sharding.spec[0], *([None] * (y.ndim - 2)))
            y = jax.lax.with_sharding_constraint(y, NamedSharding(mb_sharding.mesh, spec))
        return y

    return jax.tree.map(split, batch)


def accumulate_microbatches(
    grad_fn,
    m: int,
    *,
    valid_of=None,
    row_sharding=None,
    grad_sharding=None,
    data_parallel: int = 1,
):
    """Wrap ``grad_fn(params, ref, batch) -> ((objective, sums), grads)`` to run over ``m``
    microbatches with a ``lax.scan``, summing objective, sums and gradients (which is exact:
    the objective is a weighted sum over rows). ``data_parallel``: devices the batch rows are
    split over (``training.sharding.batch_parallel_size``).

    ``valid_of(mb)``: the microbatch's row-validity mask. A microbatch without a valid row then
    skips the forward and backward passes (a ``lax.cond`` in the same program) and adds
    nothing, which is what they would add: zero objective, zero sums (sums over valid rows)
    and zero gradients. Padding rows sit after the valid ones, so a batch's trailing
    microbatches and an empty batch cost no model pass. The running sum is the ``cond``'s
    operand and each branch returns it (the taken one with the microbatch added), so XLA
    updates it in place instead of copying a gradient tree out of the ``cond``."""

    def constrain(out):
        if grad_sharding is None:
            return out
        return out[0], jax.lax.with_sharding_constraint(out[1], grad_sharding)

    def add(params, ref, acc, mb):
        def compute(acc):
            return constrain(jax.tree.map(jnp.add, acc, grad_fn(params, ref, mb)))

        if valid_of is None:
            return compute(acc)
        return jax.lax.cond(jnp.any(valid_of(mb)), compute, lambda acc: acc, acc)

    def wrapped(params, ref, batch):
        mbs = batch if m == 1 else _split_microbatches(batch, m, row_sharding, data_parallel)
        first = batch if m == 1 else jax.tree.map(lambda x: x[0], mbs)
        out_shape = jax.eval_shape(grad_fn, params, ref, first)
        zeros = constrain(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape))
        if m == 1:
            return add(params, ref, zeros, batch)
        acc, _ = jax.lax.scan(lambda acc, mb: (add(params, ref, acc, mb), None), zeros, mbs)
        return acc

    return wrapped


@dataclasses.dataclass(frozen=True)
class LossSettings(LossHParams):
    """The objective (``config.loss``): a name in ``training.objectives.OBJECTIVES`` ('dpo' |
    'ipo': :class:`PairBatch`; 'grpo': :class:`SampleBatch`) and its hyperparameters
    (:class:`LossHParams`: beta = DPO/IPO β; nll_coef: NLL on the chosen completion;
    entropy_coef: bonus on the mean entropy of the completions, which the loss subtracts;
    kl_coef, tis_cap (None or ≤ 0: no importance weighting), tis_detach (False: the importance
    weight keeps its gradient, the reference's behaviour): GRPO)."""

    kind: str = "dpo"

    def hparams(self) -> LossHParams:
        return LossHParams(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(LossHParams)}
        )


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """How one player's step runs (``config.train`` and the role's ``compute_dtype``).

    max_tokens_per_device: token budget of one microbatch on one device (None: fixed
    ``num_microbatches``). remat: bool or a policy of ``models.transformer.REMAT_POLICIES``.
    attention_impl: 'auto' | 'xla' | 'chunked' | 'cudnn' (``models.attention``).
    step_on_empty: a batch without a valid row still runs the optimizer update.
    """

    compute_dtype: Any = jnp.bfloat16
    num_microbatches: int = 1
    max_tokens_per_device: Optional[int] = None
    chunk_size: int = 1024
    remat: Any = True
    attention_impl: str = "xla"
    step_on_empty: bool = False


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """Everything that decides one player's compiled update program besides the model shape
    and the mesh: objective, optimizer (schedule included: it runs inside the step) and step."""

    loss: LossSettings = LossSettings()
    optim: OptimizerSettings = OptimizerSettings()
    train: StepSettings = StepSettings()


def update_step_from(
    model_config: ModelConfig, settings: UpdateSettings, *, mesh=None, rules=DEFAULT_RULES
) -> "UpdateStep":
    """The one builder of a player's update step: the trainer, the capacity planner and the
    benchmarks all call it, so they compile the same program for the same settings. The
    optimizer is built here from ``settings.optim`` and exposed as ``step.optimizer`` (the
    transformation that must build ``state.opt_state``)."""
    return make_update_step(
        model_config, settings.optim.build(), settings.loss, settings.train, mesh=mesh, rules=rules
    )


def _check_settings(loss: LossSettings, train: StepSettings) -> None:
    """Reject an unknown objective, a microbatch count below one or a non-positive budget."""
    if loss.kind not in OBJECTIVES:
        raise ValueError(f"loss.kind must be one of {LOSSES}, got {loss.kind!r}")
    if train.num_microbatches < 1:
        raise ValueError(f"train.num_microbatches must be ≥ 1, got {train.num_microbatches!r}")
    budget = train.max_tokens_per_device
    if budget is not None and budget < 1:
        raise ValueError(f"train.max_tokens_per_device must be ≥ 1 or unset, got {budget!r}")
    resolve_impl(train.attention_impl)


def _rows_of(x):
    """Pairs ``[P, 2, T]`` → ``[2P, T]``; samples ``[S, T]`` unchanged."""
    return x.reshape((-1,) + x.shape[-1:])


def _objective_grad_fn(
    model_config: ModelConfig, loss: LossSettings, train: StepSettings, *, mesh, rules
):
    """``value_and_grad`` of the weighted objective over one microbatch:
    ``grad_fn(params, ref, mb) -> ((total, sums), grads)``."""
    objective_fn, kind = OBJECTIVES[loss.kind]
    hp = loss.hparams()
    opts = ForwardOptions(
        remat=remat_policy(train.remat),
        attention_impl=train.attention_impl,
        mesh=mesh,
        rules=rules,
    )
    ref_opts = dataclasses.replace(opts, remat="none")
    fwd = dict(compute_dtype=train.compute_dtype, chunk_size=train.chunk_size)
    with_entropy = loss.entropy_coef != 0.0

    def objective(params, ref, mb):
        rows = (_rows_of(mb.tokens), _rows_of(mb.attention_mask), _rows_of(mb.positions))
        lp, ent = sequence_token_logprobs(
            params, model_config, rows, options=opts, with_entropy=with_entropy, **fwd
        )
        ref_lp, _ = sequence_token_logprobs(ref, model_config, rows, options=ref_opts, **fwd)
        lmask = _shift(_rows_of(mb.loss_mask), False)
        per, sums = objective_fn(lp, jax.lax.stop_gradient(ref_lp), ent, lmask, mb, hp)
        valid = mb.pair_valid if kind == "pairs" else mb.sample_valid
        weight = mb.pair_weight if kind == "pairs" else mb.sample_weight
        total = jnp.sum(jnp.where(valid, weight * per, 0.0))
        return total, sums

    return jax.value_and_grad(objective, has_aux=True)


def _step_metrics(sums, n_valid, kind: str, *, grad_norm, apply, finite, opt_state) -> dict:
    """Means over valid rows of the objective's sums, plus the update's own scalars."""
    denom = jnp.maximum(n_valid, 1.0)
    metrics = {k: v / denom for k, v in sums.items() if k not in ("kl_k3_tokens", "num_tokens")}
    if kind == "samples":
        metrics["kl_k3"] = sums["kl_k3_tokens"] / jnp.maximum(sums["num_tokens"], 1.0)
        metrics["num_samples"] = n_valid
        metrics["num_tokens"] = sums["num_tokens"]
    else:
        metrics["num_pairs"] = n_valid
    metrics["grad_norm"] = grad_norm
    metrics["lr"] = current_lr(opt_state)
    metrics["applied"] = apply.astype(jnp.float32)
    metrics["skipped_nonfinite"] = ((n_valid > 0) & ~finite).astype(jnp.float32)
    return metrics


def _constrain_inputs(state: PlayerState, batch, model_config: ModelConfig, mesh, rules):
    """State and batch under their mesh shardings, with the state, row and gradient shardings
    (all None without a mesh)."""
    if mesh is None:
        return state, batch, None, None, None
    s_sh = state_shardings(state, model_config, mesh, rules)
    state = jax.lax.with_sharding_constraint(state, s_sh)
    b_sh = batch_shardings(batch, mesh, rules)
    batch = jax.lax.with_sharding_constraint(batch, b_sh)
    return state, batch, s_sh, b_sh.tokens, s_sh.params


def _batch_microbatches(batch, kind: str, dp: int, train: StepSettings) -> int:
    """Microbatches of a batch of this shape (decided at trace time, per length bucket)."""
    rows, t = batch.tokens.shape[0], batch.tokens.shape[-1]
    return microbatch_count(
        rows // dp,
        t * (2 if kind == "pairs" else 1),
        num_microbatches=train.num_microbatches,
        max_tokens_per_device=train.max_tokens_per_device,
    )


def _update_unless(apply, state: PlayerState, grads, optimizer) -> PlayerState:
    """The state after one optimizer update where ``apply`` holds, else ``state`` unchanged
    (params, optimizer state and step). A ``lax.cond``, not a select of new against old, so
    the update is one pass over params and moments, written in place (state is donated)."""

    def update(state):
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(
            params=optax.apply_updates(state.params, updates),
            opt_state=new_opt,
            step=state.step + 1,
        )

    return jax.lax.cond(apply, update, lambda state: state, state)


def make_update_step(
    model_config: ModelConfig,
    optimizer: optax.GradientTransformation,
    loss: LossSettings = LossSettings(),
    train: StepSettings = StepSettings(),
    *,
    mesh=None,
    rules=DEFAULT_RULES,
) -> "UpdateStep":
    """Build ``update(state, batch) -> (state, metrics)`` for one player with a given optax
    ``optimizer`` (it must be the transformation that built ``state.opt_state``); see
    :class:`LossSettings` and :class:`StepSettings`. :func:`update_step_from` builds the
    optimizer too. Batch rows must be a multiple of ``num_microbatches ×
    batch_parallel_size(mesh)`` (``collate_*`` guarantees it when given the same numbers).
    """
    _check_settings(loss, train)
    kind = OBJECTIVES[loss.kind][1]
    grad_fn = _objective_grad_fn(model_config, loss, train, mesh=mesh, rules=rules)
    dp = batch_parallel_size(mesh, rules)

    def update(state: PlayerState, batch):
        state, batch, s_sh, row_sh, grad_sh = _constrain_inputs(
            state, batch, model_config, mesh, rules
        )
        m = _batch_microbatches(batch, kind, dp, train)
        params = state.params
        ref = jax.lax.stop_gradient(reference_params(state))
        valid = batch.pair_valid if kind == "pairs" else batch.sample_valid
        n_valid = jnp.sum(valid.astype(jnp.float32))
        run = accumulate_microbatches(
            grad_fn,
            m,
            valid_of=lambda mb: mb.pair_valid if kind == "pairs" else mb.sample_valid,
            row_sharding=row_sh,
            grad_sharding=grad_sh,
            data_parallel=dp,
        )
        (_, sums), grads = run(params, ref, batch)

        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient (e.g. from corrupted inputs) skips the update like an
        # empty batch does, so it can never reach the params or a checkpoint.
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(sums["loss"])
        apply = ((n_valid > 0) | train.step_on_empty) & finite
        new_state = _update_unless(apply, state, grads, optimizer)
        if s_sh is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, s_sh)
        metrics = _step_metrics(
            sums,
            n_valid,
            kind,
            grad_norm=grad_norm,
            apply=apply,
            finite=finite,
            opt_state=new_state.opt_state,
        )
        return new_state, metrics

    jitted = jax.jit(update, donate_argnums=0)
    return UpdateStep(jitted, model_config, mesh, rules, train.num_microbatches, optimizer)


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

    def __init__(
        self,
        jitted,
        config: ModelConfig,
        mesh,
        rules,
        num_microbatches: int,
        optimizer: optax.GradientTransformation,
    ):
        self._jitted = jitted
        self.optimizer = optimizer  # the transformation that builds ``state.opt_state``
        self._config = config
        self._mesh = mesh
        self._rules = rules
        self._m = num_microbatches

    @property
    def data_parallel_size(self) -> int:
        """Devices the batch rows are split over; pass it to ``collate_*``."""
        return batch_parallel_size(self._mesh, self._rules)

    def _place(self, state: PlayerState, batch):
        if self._mesh is None:
            # Commit state and batch to the params' device (no copy when already there), so a
            # fresh, uncommitted state does not compile a second program.
            device = next(iter(jax.tree.leaves(state.params)[0].devices()))
            return jax.device_put(state, device), jax.device_put(batch, device)
        # Already-placed arrays are not copied; anything else is laid out on the mesh.
        state = jax.device_put(state, state_shardings(state, self._config, self._mesh, self._rules))
        return state, shard_batch(batch, self._mesh, self._rules)

    def __call__(self, state: PlayerState, batch):
        if not state.trainable:
            return state, {}
        rows = batch.tokens.shape[0]
        need = self._m * self.data_parallel_size
        if rows % need:
            raise ValueError(
                f"batch has {rows} rows, not a multiple of num_microbatches × "
                f"data-parallel size = {need}; collate with the same numbers"
            )
        return self._jitted(*self._place(state, batch))

    def lower(self, state: PlayerState, batch):
        """``jax.jit(...).lower`` of the step (arrays or sharded ``ShapeDtypeStruct``)."""
        return self._jitted.lower(state, batch)

    def lower_call(self, state: PlayerState, batch):
        """The lowering of exactly what ``self(state, batch)`` runs (concrete inputs placed as
        a call places them)."""
        return self._jitted.lower(*self._place(state, batch))

    def cache_size(self) -> int:
        """Number of compiled variants held (for recompilation checks)."""
        return self._jitted._cache_size()
