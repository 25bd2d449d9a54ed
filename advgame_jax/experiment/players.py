"""Players: for the attacker and the defender, the model, tokenizer, sampler, optimizer, update
step and the state pytree, built from one ``config.<role>`` block; and weight sync to samplers.

Placement (``advgame_jax.sampling.placement``): ``jax`` (in-trainer JAX sampler),
``colocated`` (vLLM inside the trainer under an explicit memory plan) or ``offloaded`` (a vLLM
server on other devices or hosts, spawned here or user-started; ``sampling.engines``).

Sync (GAME_SPEC §2.1), through the one ``Sampler`` contract (``sampling.base``): the JAX
sampler loads the sampling params in memory (``InMemoryWeights``, no recompile); a vLLM engine
loads a versioned, committed Orbax checkpoint in the engine's dtype written shard by shard to
``<workdir>/sync/<role>/v<step>`` (``SyncCheckpoint``, ``sampling.weight_sync``). Every
completion carries the weights version it came from; a completion from any other version than
the last sync raises ``StaleWeightsError``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax

from advgame_jax.experiment.update_settings import DTYPES, player_training
from advgame_jax.experiment.validate import ConfigError
from advgame_jax.models import ModelConfig, load_hf, param_shardings
from advgame_jax.sampling.base import (
    Completion,
    InMemoryWeights,
    Sampler,
    SamplingParams,
    SyncCheckpoint,
    WeightsRef,
)
from advgame_jax.sampling.placement import completion_budget, max_model_len, placement_of
from advgame_jax.settings import Settings
from advgame_jax.tokenization import ChatTokenizer
from advgame_jax.training.state import PlayerState, sampling_params
from advgame_jax.training.update import UpdateSettings, UpdateStep, update_step_from


@dataclasses.dataclass
class Player:
    """Everything one player needs besides its (separately threaded) ``PlayerState``."""

    role: str
    model_config: ModelConfig
    tokenizer: ChatTokenizer
    hf_dir: str
    update: UpdateStep
    trainable: bool
    sampler_kind: str
    optimizer: Any
    placement: str = "jax"
    sampler_dtype: str = "float32"
    keep_sync_checkpoints: int = 2
    weights_version: Optional[int] = None
    # The player's sampler behind the version check; set by ``build_player``.
    sampler: "VersionedSampler" = dataclasses.field(init=False, repr=False)


class StaleWeightsError(RuntimeError):
    """A sampler answered with weights other than the ones the trainer last synced."""


class VersionedSampler:
    """The trainer's view of a player's sampler: the ``Sampler`` contract, forwarded to the
    placement's sampler (``inner``), checking every completion's ``weights_version`` against
    the player's last sync and refusing stale weights (a completion without a version gets
    the sync's)."""

    def __init__(self, inner: Sampler, player_ref: "Player"):
        self.inner, self._player = inner, player_ref

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        expected = self._player.weights_version
        out = self.inner.generate(prompt_token_ids, params)
        result = []
        for c in out:
            if c.weights_version is None:
                c = dataclasses.replace(c, weights_version=expected)
            elif c.weights_version != expected:
                raise StaleWeightsError(
                    f"{self._player.role} sampler generated with weights version "
                    f"{c.weights_version}, but the trainer's last sync was version {expected}"
                )
            result.append(c)
        return result

    @property
    def prompt_budget(self) -> int:
        return self.inner.prompt_budget

    def load_weights(self, ref: WeightsRef) -> int:
        """Load ``ref`` into the inner sampler; it becomes the player's synced version."""
        loaded = self.inner.load_weights(ref)
        want = ref.version
        if want is not None and loaded != int(want):
            raise StaleWeightsError(
                f"{self._player.role} sampler loaded weights version {loaded}, expected {want}"
            )
        self._player.weights_version = int(loaded)
        return self._player.weights_version

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


def check_checkpoint_dir(path: str, field: str) -> None:
    """Raise ``ConfigError`` naming ``field`` unless ``path`` looks like an HF checkpoint dir."""
    if not os.path.isdir(path):
        raise ConfigError(
            f"config.{field}: {path!r} is not a directory; expected a local "
            "Hugging Face checkpoint (config.json + *.safetensors)"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"config.{field}: {path!r} has no config.json")
    if not any(
        f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in os.listdir(path)
    ):
        raise ConfigError(f"config.{field}: {path!r} has no .safetensors weights")


def build_player(
    config,
    role: str,
    hf_dir: str,
    mesh,
    *,
    settings: Settings,
    total_updates: int,
    update_steps: Optional[dict] = None,
) -> tuple[Player, Any]:
    """Load ``role``'s checkpoint and build its sampler and update step (``update_steps``: the
    run's map of steps already built, shared between same-architecture players; ``settings``:
    the converted ``config``, read by the optimizer and the update step).

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
        model_config = ModelConfig.from_hf_dict(
            json.load(f), source=os.path.join(hf_dir, "config.json")
        )
    shardings = param_shardings(model_config, mesh)
    model_config, params = load_hf(hf_dir, DTYPES[pc.param_dtype], shardings=shardings)

    sampler = _build_sampler(
        config, role, hf_dir, model_config, params, tokenizer, mesh, settings=settings
    )

    update = _update_step(model_config, player_training(settings, role).update, mesh, update_steps)
    placement = settings.player(role).placement
    player = Player(
        role=role,
        model_config=model_config,
        tokenizer=tokenizer,
        hf_dir=hf_dir,
        update=update,
        trainable=bool(pc.trainable),
        sampler_kind="jax" if placement == "jax" else "vllm",
        optimizer=update.optimizer,
        placement=placement,
        sampler_dtype=pc.sampler_dtype,
        keep_sync_checkpoints=int(pc.engine.keep_sync_checkpoints) if "engine" in pc else 2,
    )
    player.sampler = VersionedSampler(sampler, player)
    return player, params


def _build_sampler(
    config, role: str, hf_dir: str, model_config, params, tokenizer, mesh, *, settings: Settings
):
    """The sampler of ``role`` for its placement (module docstring)."""
    placement = placement_of(settings, role)
    if placement == "jax":
        return _jax_sampler(config[role], model_config, params, tokenizer, mesh)
    n_ctx = max_model_len(settings, role, model_config.max_position_embeddings)
    if n_ctx > model_config.max_position_embeddings:
        raise ConfigError(
            f"config.{role}.engine.max_prompt_tokens + config.{role}.max_new_tokens (or "
            f"config.sampling.max_new_tokens) = {n_ctx} "
            f"exceeds the model's max_position_embeddings={model_config.max_position_embeddings} "
            f"({hf_dir}/config.json); lower the prompt or completion budget"
        )
    budget = _prompt_budget(settings, role, n_ctx)
    if placement == "offloaded":
        return _offloaded_sampler(config, role, hf_dir, model_config, tokenizer, n_ctx, budget)
    return _colocated_sampler(config, role, hf_dir, tokenizer, n_ctx, budget)


def _prompt_budget(settings: Settings, role: str, n_ctx: int) -> int:
    """An engine's prompt budget: its context less the player's completion budget."""
    return max(n_ctx - completion_budget(settings, role), 1)


def _jax_sampler(pc, model_config, params, tokenizer, mesh):
    from advgame_jax.sampling.jax_sampler import JaxSampler

    if jax.process_count() > 1:
        # Several processes: each one samples its own seeds on its own devices.
        from advgame_jax.experiment.hosts import local_copy

        params, mesh = local_copy(params), None
    return JaxSampler(
        model_config,
        params,
        tokenizer=tokenizer,
        mesh=mesh,
        compute_dtype=DTYPES[pc.sampler_dtype],
        min_batch_bucket=pc.sampler_min_batch_bucket,
        min_prompt_bucket=pc.sampler_min_prompt_bucket,
    )


def _engine_client(config, role: str, hf_dir: str, n_ctx: int):
    """A client of ``role``'s engine: a user-started one at ``engine.address``, or one
    spawned here under ``<workdir>/engines``."""
    from advgame_jax.sampling.engines import EngineClient, EngineSpec

    pc = config[role]
    e = pc.engine
    if e.address:
        return EngineClient.connect(
            role, e.address, e.authkey_env, request_timeout_s=e.request_timeout_s
        )
    spec = EngineSpec(
        role=role,
        hf_dir=os.path.abspath(hf_dir),
        dtype=pc.sampler_dtype,
        tensor_parallel_size=e.tensor_parallel_size,
        gpu_memory_utilization=e.gpu_memory_utilization,
        max_model_len=n_ctx,
        kv_cache_bytes=pc.vllm_kv_cache_bytes,
        enforce_eager=e.enforce_eager,
        seed=config.seed,
        devices=e.devices,
    )
    return EngineClient.spawn(
        spec,
        os.path.join(os.path.abspath(config.workdir), "engines"),
        startup_timeout_s=e.startup_timeout_s,
        request_timeout_s=e.request_timeout_s,
    )


def _offloaded_sampler(
    config, role: str, hf_dir: str, model_config, tokenizer, n_ctx: int, prompt_budget: int
):
    from advgame_jax.sampling.engines import RemoteSampler

    client = _engine_client(config, role, hf_dir, n_ctx)
    try:
        return RemoteSampler(
            client,
            model_config,
            tokenizer=tokenizer,
            load_timeout_s=config[role].engine.startup_timeout_s,
            prompt_budget=prompt_budget,
        )
    except BaseException:
        client.close()  # a spawned engine that failed its first request is stopped
        raise


def _colocated_sampler(config, role: str, hf_dir: str, tokenizer, n_ctx: int, prompt_budget: int):
    pc = config[role]
    e = pc.engine
    try:
        from advgame_jax.sampling.vllm_sampler import VllmSampler
    except ImportError as err:
        raise ConfigError(
            f"config.{role}.placement='colocated' needs the vllm extra "
            f"(pip install 'advgame_jax[vllm]'): {err}"
        ) from None
    kw: dict = dict(tensor_parallel_size=e.tensor_parallel_size, enforce_eager=e.enforce_eager)
    if e.gpu_memory_utilization > 0:
        kw["gpu_memory_utilization"] = e.gpu_memory_utilization
    return VllmSampler(
        hf_dir,
        tokenizer=tokenizer,
        dtype=pc.sampler_dtype,
        kv_cache_memory_bytes=pc.vllm_kv_cache_bytes,
        max_model_len=n_ctx,
        prompt_budget=prompt_budget,
        seed=config.seed,
        **kw,
    )


def close_player(player: Player) -> None:
    """Shut down the player's engine (offloaded process or colocated engine), if any."""
    player.sampler.close()


def _update_step(
    model_config, settings: UpdateSettings, mesh, shared: Optional[dict]
) -> UpdateStep:
    """The player's update step (``training.update.update_step_from``, the planner's builder
    too). ``shared``: a map owned by the caller (one run) from (model, settings) to steps
    already built, so attacker and defender of the same architecture and settings share one
    compiled program."""
    key = (model_config, settings)
    if shared is not None and key in shared:
        return shared[key]
    step = update_step_from(model_config, settings, mesh=mesh)
    if shared is not None:
        shared[key] = step
    return step


def initial_state(player: Player, params, config) -> PlayerState:
    """The player's state at step 0 (EMA = θ; θ₀ kept when the reference is 'initial').
    ``config``: the run's converted ``Settings`` (a ConfigDict is converted again)."""
    return player_training(config, player.role).state.init(params, player.optimizer)


def sync_sampler(
    player: Player,
    state: PlayerState,
    sample_from: str,
    workdir: str,
    version: Optional[int] = None,
) -> int:
    """Give ``player``'s sampler the params it should sample from (GAME_SPEC §2.1), as weights
    version ``version`` (the trainer step; default: one past the last). Returns the version."""
    if version is None:
        version = 0 if player.weights_version is None else player.weights_version + 1
    params = sampling_params(state, sample_from)
    if jax.process_count() > 1:
        from advgame_jax.experiment.hosts import local_copy

        params = local_copy(params)  # each process's sampler runs on its own devices
    # Raises StaleWeightsError unless the sampler loaded exactly ``version``.
    return player.sampler.load_weights(_weights_ref(player, params, int(version), workdir))


def _weights_ref(player: Player, params, version: int, workdir: str) -> WeightsRef:
    """The placement's one weight path: in memory for the JAX sampler (which keeps a private
    copy cast to its dtype: the trainer donates its state to the next update / EMA step, which
    must not free the sampler's weights); a committed sync checkpoint for a vLLM engine."""
    if player.placement == "jax":
        return InMemoryWeights(params, version)
    from advgame_jax.sampling.weight_sync import write_sync_checkpoint

    path = write_sync_checkpoint(
        os.path.join(workdir, "sync", player.role),
        params,
        version=version,
        role=player.role,
        dtype=DTYPES[player.sampler_dtype],
        keep=player.keep_sync_checkpoints,
    )
    return SyncCheckpoint(path, version)


def resolve_mesh(config):
    """The ``mesh`` section → ``Mesh``; one axis may be -1: all devices the others leave.
    With ``dcn_*`` sizes: a hybrid mesh (``distributed.build_mesh``), the plain sizes counting
    devices per host/slice; without, one flat mesh over every device of every process.
    ``config``: the run's converted ``Settings`` (a ConfigDict is converted first)."""
    from advgame_jax import distributed
    from advgame_jax.experiment.validate import as_settings
    from advgame_jax.models import make_mesh
    from advgame_jax.sampling.placement import apply_memory_plan

    settings = as_settings(config)
    apply_memory_plan(settings)  # JAX's device-memory share, before JAX initialises
    mesh = settings.mesh
    sizes = dataclasses.asdict(mesh)  # axis name -> size, dcn_<axis> -> hosts/slices
    dcn = {a: int(sizes[f"dcn_{a}"]) for a in distributed.MESH_AXES}
    if any(v != 1 for v in dcn.values()):
        ici = {a: int(sizes[a]) for a in distributed.MESH_AXES}
        try:
            return distributed.build_mesh(ici, dcn)
        except distributed.WorldError as e:
            raise ConfigError(str(e)) from None
    from advgame_jax.plan_inputs import resolve_mesh_shape

    try:
        data, fsdp, tensor = resolve_mesh_shape(mesh, jax.device_count())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return make_mesh(
        data=data, fsdp=fsdp, tensor=tensor, devices=jax.devices()[: data * fsdp * tensor]
    )
