"""Players: for the attacker and the defender, the model, tokenizer, sampler, optimizer, update
step and the state pytree, built from one ``config.<role>`` block; and weight sync to samplers.

Sync (GAME_SPEC §2.1): the JAX sampler takes the sampling params in memory (no recompile);
the vLLM sampler is refreshed from an Orbax checkpoint written to ``<workdir>/sync/<role>``
at every sync, which is how a separate inference engine sees the trainer's weights.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp

from advgame_jax.experiment.validate import ConfigError
from advgame_jax.models import ModelConfig, load_hf, param_shardings
from advgame_jax.tokenization import ChatTokenizer
from advgame_jax.training.optimizer import make_optimizer
from advgame_jax.training.state import PlayerState, init_player_state, sampling_params
from advgame_jax.training.update import UpdateStep, make_update_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Player:
    """Everything one player needs besides its (separately threaded) ``PlayerState``."""

    role: str
    model_config: ModelConfig
    tokenizer: ChatTokenizer
    hf_dir: str
    sampler: Any
    update: UpdateStep
    trainable: bool
    sampler_kind: str
    optimizer: Any


def check_checkpoint_dir(path: str, field: str) -> None:
    """Raise ``ConfigError`` naming ``field`` unless ``path`` looks like an HF checkpoint dir."""
    if not os.path.isdir(path):
        raise ConfigError(f"config.{field}: {path!r} is not a directory; expected a local "
                          "Hugging Face checkpoint (config.json + *.safetensors)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"config.{field}: {path!r} has no config.json")
    if not any(f.endswith(".safetensors") or f == "model.safetensors.index.json"
               for f in os.listdir(path)):
        raise ConfigError(f"config.{field}: {path!r} has no .safetensors weights")


def build_player(config, role: str, hf_dir: str, mesh, *, total_updates: int,
                 update_steps: Optional[dict] = None) -> tuple[Player, Any]:
    """Load ``role``'s checkpoint and build its sampler and update step (``update_steps``: the
    run's map of steps already built, shared between same-architecture players).

    Returns ``(player, initial_params)`` (fp32 master params placed with the mesh shardings).
    """
    pc = config[role]
    check_checkpoint_dir(hf_dir, f"{role}.hf_path")
    tok_dir = pc.tokenizer_path or hf_dir
    try:
        tokenizer = ChatTokenizer.from_dir(tok_dir)
    except ValueError as e:
        raise ConfigError(f"config.{role}.tokenizer_path: {e}") from None
    import json

    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        model_config = ModelConfig.from_hf_dict(json.load(f), source=os.path.join(hf_dir, "config.json"))
    shardings = param_shardings(model_config, mesh)
    model_config, params = load_hf(hf_dir, DTYPES[pc.param_dtype], shardings=shardings)

    if pc.sampler == "jax":
        from advgame_jax.sampling.jax_sampler import JaxSampler

        sampler = JaxSampler(model_config, params, tokenizer=tokenizer, mesh=mesh,
                             compute_dtype=DTYPES[pc.sampler_dtype],
                             min_batch_bucket=pc.sampler_min_batch_bucket,
                             min_prompt_bucket=pc.sampler_min_prompt_bucket)
    else:
        try:
            from advgame_jax.sampling.vllm_sampler import VllmSampler
        except ImportError as e:
            raise ConfigError(f"config.{role}.sampler='vllm' needs the vllm extra "
                              f"(pip install 'advgame_jax[vllm]'): {e}") from None
        sampler = VllmSampler(hf_dir, tokenizer=tokenizer, dtype=pc.sampler_dtype,
                              kv_cache_memory_bytes=pc.vllm_kv_cache_bytes,
                              max_model_len=pc.vllm_max_model_len or None, seed=config.seed)

    o = config.optim
    optimizer = make_optimizer(o.lr, num_steps=total_updates, b1=o.b1, b2=o.b2,
                               weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                               final_lr_fraction=o.final_lr_fraction, warmup_steps=o.warmup_steps,
                               mu_dtype=DTYPES[o.mu_dtype])
    update = _update_step(config, model_config, optimizer, pc.compute_dtype, mesh, update_steps)
    player = Player(role=role, model_config=model_config, tokenizer=tokenizer, hf_dir=hf_dir,
                    sampler=sampler, update=update, trainable=bool(pc.trainable),
                    sampler_kind=pc.sampler, optimizer=optimizer)
    return player, params


def _update_step(config, model_config, optimizer, compute_dtype: str, mesh,
                 shared: Optional[dict]) -> UpdateStep:
    """The player's update step. ``shared``: a map owned by the caller (one run) from
    (model, compute dtype) to steps already built, so attacker and defender of the same
    architecture share one compiled program; everything else comes from the one config."""
    key = (model_config, compute_dtype)
    if shared is not None and key in shared:
        return shared[key]
    L, T = config.loss, config.train
    step = make_update_step(
        model_config, optimizer=optimizer, loss=L.kind, beta=L.beta,
        length_normalization=L.length_normalization, nll_coef=L.nll_coef,
        entropy_coef=L.entropy_coef, kl_coef=L.kl_coef, tis_cap=L.tis_cap or None,
        num_microbatches=T.num_microbatches, compute_dtype=DTYPES[compute_dtype],
        chunk_size=T.logprob_chunk_size, remat=T.remat_policy if T.remat else "none",
        attention_impl=T.attention, max_tokens_per_device=T.max_tokens_per_device or None,
        mesh=mesh)
    if shared is not None:
        shared[key] = step
    return step


def initial_state(player: Player, params, config) -> PlayerState:
    """The player's state at step 0 (EMA = θ; θ₀ kept when the reference is 'initial')."""
    keep_ema = config.train.sample_from == "ema" or config.train.reference == "ema"
    return init_player_state(
        params, player.optimizer if player.trainable else None,
        reference=config.train.reference, keep_ema=keep_ema, trainable=player.trainable,
        ema_dtype=DTYPES[config.train.ema_dtype])


def sync_sampler(player: Player, state: PlayerState, sample_from: str, workdir: str) -> None:
    """Give ``player``'s sampler the params it should sample from (GAME_SPEC §2.1)."""
    params = sampling_params(state, sample_from)
    if player.sampler_kind == "jax":
        # The sampler keeps a private copy (cast to its dtype): the trainer donates its state
        # to the next update / EMA step, which must not free the sampler's weights.
        player.sampler.update_weights(params=params)
        return
    from advgame_jax.sampling.checkpoints import save_params

    path = os.path.join(workdir, "sync", player.role)
    shutil.rmtree(path, ignore_errors=True)
    save_params(path, params)
    player.sampler.update_weights(checkpoint_path=path)


def resolve_mesh(config):
    """``config.mesh`` → ``Mesh``; one axis may be -1: all devices the others leave."""
    from advgame_jax.models import make_mesh

    from advgame_jax.training.planning import resolve_mesh_shape

    try:
        data, fsdp, tensor = resolve_mesh_shape(config.mesh, jax.device_count())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=jax.devices()[: data * fsdp * tensor])
