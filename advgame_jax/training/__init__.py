"""Training of one player: state (θ, optimizer, θ̄, reference), AdamW, EMA, batch collation,
the sharded jitted update step (DPO / IPO / GRPO), Orbax checkpoints and HF export.

The game loop calls, per player and seed split::

    batch = collate_pairs(pairs, pad_id=..., num_microbatches=M,
                          data_parallel_size=update.data_parallel_size)
    state, metrics = update(state, batch)        # one optimizer update
and once per trainer step ``state = ema_step(state, decay)``.

Also here: ``objectives`` (the loss registry the update step dispatches on), ``capacity``
(compile-only memory and collective analysis of the step) and ``planning`` (both players'
plans on a mesh, behind ``launch/plan.py``).
"""

from advgame_jax.training.batching import (
    PairBatch,
    SampleBatch,
    collate_pairs,
    collate_samples,
    length_bucket,
    row_bucket,
)
from advgame_jax.training.checkpoint import CheckpointError, GameCheckpointer
from advgame_jax.training.ema import ema_step, ema_update
from advgame_jax.training.export import AttackerExportError, export_hf, is_controlled_artifact
from advgame_jax.training.optimizer import (
    OptimizerSettings,
    current_lr,
    make_lr_schedule,
    make_optimizer,
)
from advgame_jax.training.sharding import (
    batch_parallel_size,
    batch_shardings,
    shard_batch,
    shard_state,
    state_shardings,
)
from advgame_jax.training.state import (
    PlayerState,
    StateSettings,
    abstract_player_state,
    init_player_state,
    reference_params,
    sampling_params,
)
from advgame_jax.training.update import (
    LossSettings,
    StepSettings,
    UpdateSettings,
    UpdateStep,
    make_update_step,
    update_step_from,
)

__all__ = [
    "PairBatch",
    "SampleBatch",
    "collate_pairs",
    "collate_samples",
    "length_bucket",
    "row_bucket",
    "CheckpointError",
    "GameCheckpointer",
    "ema_step",
    "ema_update",
    "AttackerExportError",
    "export_hf",
    "is_controlled_artifact",
    "current_lr",
    "make_lr_schedule",
    "make_optimizer",
    "batch_parallel_size",
    "batch_shardings",
    "shard_batch",
    "shard_state",
    "state_shardings",
    "PlayerState",
    "abstract_player_state",
    "init_player_state",
    "reference_params",
    "sampling_params",
    "UpdateStep",
    "make_update_step",
    "update_step_from",
    "UpdateSettings",
    "LossSettings",
    "StepSettings",
    "StateSettings",
    "OptimizerSettings",
]
