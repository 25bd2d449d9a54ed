"""The per-player optimizer (GAME_SPEC §2.12): AdamW behind global-norm clipping, with a
linear warm-up then cosine decay to ``final_lr_fraction × lr``.

Two schedule shapes (``OptimSettings.lr_schedule``, ``config.optim.lr_schedule``):

- ``"cycle"`` (the reference's, paper configs): the cosine runs over a cycle of
  ``train.num_steps`` optimizer updates and restarts at ``lr``. The game makes one update per
  seed split, two per trainer step, so the cycle ends at trainer step ``num_steps / 2`` and a
  second identical cycle fills the rest of the run.
- ``"run"``: one cosine over every update of the run (``2 × train.num_steps``), constant at
  ``final_lr_fraction × lr`` afterwards.

The learning rate is injected as an optax hyperparameter, so the rate used by the latest
update lives in the optimizer state (``current_lr``) and is checkpointed with it. Norm
weights and biases are not weight-decayed (their names end in ``_norm`` / ``_bias`` in the
model's param tree; see ``advgame_jax.models.params``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cycle", "run")


def make_lr_schedule(
    lr: float = 1e-6,
    *,
    num_steps: int,
    final_lr_fraction: float = 0.2,
    warmup_steps: int = 0,
    restart: bool = False,
):
    """Schedule ``count -> lr`` for ``count`` = number of optimizer updates already applied.

    Warm-up: ``lr × (count + 1) / warmup_steps`` for ``count < warmup_steps`` (the first
    update already moves the params). Then cosine from ``lr`` at ``count = warmup_steps`` to
    ``final_lr_fraction × lr`` at ``count = num_steps``, constant afterwards; with
    ``restart`` the cosine instead starts again at ``lr`` every ``num_steps − warmup_steps``
    updates (warm restarts without warm-up, as fairseq2's cosine annealing with a cycle
    multiplier of 1).
    """
    if num_steps <= 0:
        raise ValueError(f"optimizer num_steps must be a positive int, got {num_steps!r}")
    if not 0 <= warmup_steps < num_steps:
        raise ValueError(
            f"optimizer warmup_steps must be in [0, num_steps={num_steps}), got {warmup_steps!r}"
        )
    if not 0.0 <= final_lr_fraction <= 1.0:
        raise ValueError(
            f"optimizer final_lr_fraction must be in [0, 1], got {final_lr_fraction!r}"
        )
    decay_steps = num_steps - warmup_steps

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = (count + 1.0) / max(warmup_steps, 1)
        since = count - warmup_steps
        if restart:
            since = jnp.mod(jnp.maximum(since, 0.0), decay_steps)
        progress = jnp.clip(since / decay_steps, 0.0, 1.0)
        cosine = final_lr_fraction + (1.0 - final_lr_fraction) * 0.5 * (
            1.0 + jnp.cos(jnp.pi * progress)
        )
        return lr * jnp.where(count < warmup_steps, warm, cosine)

    return schedule


def _decay_mask(params):
    def keep(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith("_norm") or name.endswith("_bias"))

    return jax.tree_util.tree_map_with_path(keep, params)


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Everything :func:`make_optimizer` takes, as one frozen value (``config.optim`` with the
    run's update count; ``experiment.update_settings`` maps the config block onto it).

    ``num_steps`` counts OPTIMIZER updates (the game does one per seed split, so a run of N
    trainer steps over two splits makes 2N updates). ``clip_norm <= 0`` disables clipping.
    ``restart``: the cosine restarts every ``num_steps`` updates (see :func:`make_lr_schedule`).
    ``mu_dtype``: storage dtype of Adam's first moment (None: the params' dtype).
    """

    lr: float = 1e-6
    num_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    final_lr_fraction: float = 0.2
    warmup_steps: int = 0
    restart: bool = False
    decay_norms_and_biases: bool = False
    mu_dtype: Any = None

    def build(self) -> optax.GradientTransformation:
        """AdamW (decoupled weight decay) after global-norm clipping at ``clip_norm``."""
        schedule = make_lr_schedule(
            self.lr,
            num_steps=self.num_steps,
            final_lr_fraction=self.final_lr_fraction,
            warmup_steps=self.warmup_steps,
            restart=self.restart,
        )
        adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask", "mu_dtype"))(
            learning_rate=schedule,
            b1=self.b1,
            b2=self.b2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            mask=None if self.decay_norms_and_biases else _decay_mask,
            mu_dtype=self.mu_dtype,
        )
        if self.clip_norm and self.clip_norm > 0:
            return optax.chain(optax.clip_by_global_norm(self.clip_norm), adamw)
        return adamw


def make_optimizer(lr: float = 1e-6, *, num_steps: int, **settings) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) after global-norm clipping at ``clip_norm``:
    ``OptimizerSettings(lr=lr, num_steps=num_steps, **settings).build()``; the other settings
    (b1, b2, eps, weight_decay, clip_norm, final_lr_fraction, warmup_steps, restart,
    decay_norms_and_biases, mu_dtype) and their defaults are :class:`OptimizerSettings`'s."""
    return OptimizerSettings(lr=lr, num_steps=num_steps, **settings).build()


def current_lr(opt_state):
    """The learning rate of the latest update (fp32 scalar; NaN if the state has none)."""
    lr = optax.tree_utils.tree_get(
        opt_state, "learning_rate", default=None, filtering=lambda _, v: hasattr(v, "dtype")
    )
    if lr is None:
        return jnp.float32(jnp.nan)
    return jnp.asarray(lr, jnp.float32)
