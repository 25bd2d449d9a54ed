"""The experiment's settings as typed, frozen dataclasses: one per section of
``experiment/configs/base.py``.

Users write ``configs/*.py`` files whose ``get_config()`` returns an ml_collections
``ConfigDict``; ``advgame_jax.experiment.validate.settings_from_config`` converts it ONCE, at
start-up, into a :class:`Settings` tree. Code below ``experiment/`` takes a section
(``OptimSettings``, ``GameSettings``, …) or plain arguments, never the ConfigDict, and this
module imports nothing of ml_collections.

What each field accepts is stated on the field (:func:`setting`):

* ``choices``: a tuple, or the name of a registry (``"objectives"``, ``"template_sets"``, …)
  that the converter resolves from the module defining it, so an enumeration is written once;
* ``minimum`` / ``maximum`` / ``low_open`` / ``also``: numeric range (``also``: extra values
  outside it, e.g. ``-1`` = "all remaining devices");
* ``resumable``: the field (or the whole section below it) may differ between a checkpoint and
  the run resuming it: where things are written, how often, logging, validation, judge
  transport, sampler placement and engine, device layout. Any other difference refuses the
  resume (the state or the training semantics would change);
* ``added``: the field was added after checkpoints were first written; the value given
  computes what the older code did, so a checkpoint saved before the field existed resumes
  when the field holds that value now.

A section built directly in code (tests, tools) is trusted like any typed argument; only the
converter checks values, and it raises :class:`ConfigError` naming ``config.<section>.<field>``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, TypedDict, Union, Unpack

from advgame_jax.errors import UserError

ROLES = ("attacker", "defender")


class ConfigError(UserError, ValueError):
    """A config field is missing, malformed or inconsistent with another field."""


class SettingRules(TypedDict, total=False):
    """What the converter accepts for a field (module docstring); every key is optional.
    ``added``: the value a run that predates the field is taken to have used."""

    choices: Union[tuple, str, None]
    minimum: Any
    maximum: Any
    low_open: bool
    also: tuple
    resumable: bool
    added: Any
    nonempty: bool


_RULE_DEFAULTS = dict(
    choices=None,
    minimum=None,
    maximum=None,
    low_open=False,
    also=(),
    resumable=False,
    nonempty=False,
)


def setting(default: Any, **rules: Unpack[SettingRules]) -> Any:
    """A dataclass field with what the converter accepts for it (:class:`SettingRules`)."""
    unknown = sorted(set(rules) - set(SettingRules.__annotations__))
    if unknown:
        raise TypeError(f"setting() got unknown rules {unknown}")
    meta: dict = {k: rules.get(k, v) for k, v in _RULE_DEFAULTS.items()}
    meta["also"] = tuple(meta["also"])
    if "added" in rules:
        meta["added"] = rules["added"]
    return dataclasses.field(default=default, metadata=meta)


def section(cls, *, resumable: bool = False) -> Any:
    """A nested section field (``resumable``: the whole section may change on resume)."""
    return dataclasses.field(default_factory=cls, metadata=dict(resumable=resumable, section=True))


# ------------------------------------------------------------------ sections


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """``<role>.engine``: vLLM engine options of a colocated / offloaded placement."""

    address: str = setting("")  # offloaded: 'host:port' of a user-started vLLM server
    authkey_env: str = setting("")  # env var holding that server's API key ('' = none)
    devices: str = setting("")  # offloaded: CUDA_VISIBLE_DEVICES of the engine
    tensor_parallel_size: int = setting(1, minimum=1)
    gpu_memory_utilization: float = setting(0.0, minimum=0.0, maximum=1.0)
    max_prompt_tokens: int = setting(0, minimum=0)
    enforce_eager: bool = setting(False)
    startup_timeout_s: float = setting(900.0, minimum=0.0, maximum=1e9, low_open=True)
    request_timeout_s: float = setting(3600.0, minimum=0.0, maximum=1e9, low_open=True)
    keep_sync_checkpoints: int = setting(2, minimum=1)


@dataclasses.dataclass(frozen=True)
class PlayerSettings:
    """``attacker`` / ``defender``: the model, its precision and where its sampler runs.

    ``placement`` is the one field saying which sampler runs where (``"jax"``, ``"colocated"``
    vLLM, ``"offloaded"`` vLLM); the older ``sampler`` field is translated by the converter."""

    hf_path: str = setting("")
    tokenizer_path: str = setting("")
    trainable: bool = setting(True)
    param_dtype: str = setting("float32", choices="dtypes")
    compute_dtype: str = setting("bfloat16", choices="dtypes")
    sampler_dtype: str = setting("bfloat16", choices="dtypes", resumable=True)
    sampler_min_batch_bucket: int = setting(1, minimum=1, resumable=True)
    sampler_min_prompt_bucket: int = setting(16, minimum=1, resumable=True)
    vllm_kv_cache_bytes: int = setting(2 * 1024**3, minimum=0, resumable=True)
    vllm_max_model_len: int = setting(0, minimum=0, resumable=True)
    max_new_tokens: int = setting(0, minimum=0, added=0)  # 0: sampling.max_new_tokens
    role: str = setting("", choices=ROLES)
    placement: str = setting("jax", choices="placements", resumable=True)
    engine: EngineSettings = section(EngineSettings, resumable=True)


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """``mesh``: device mesh sizes inside one host/slice, and across hosts (``dcn_*``)."""

    data: int = setting(-1, minimum=1, also=(-1,))
    fsdp: int = setting(1, minimum=1, also=(-1,))
    tensor: int = setting(1, minimum=1, also=(-1,))
    dcn_data: int = setting(1, minimum=1)
    dcn_fsdp: int = setting(1, minimum=1)
    dcn_tensor: int = setting(1, minimum=1)


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """``distributed``: joining a multi-process world (empty/0: from the environment)."""

    coordinator: str = setting("")
    num_processes: int = setting(0, minimum=0)
    process_id: int = setting(-1, minimum=-1)


@dataclasses.dataclass(frozen=True)
class MemoryPlanSettings:
    """``placement``: the colocated memory plan (JAX's share of each device + a margin)."""

    jax_memory_fraction: float = setting(0.0, minimum=0.0, maximum=1.0)
    device_memory_margin: float = setting(0.05, minimum=0.0, maximum=0.5)


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """``judge``: which judge, how it decodes, and the endpoint transport."""

    backend: str = setting("endpoint", choices="judge_backends")
    endpoints: tuple[str, ...] = setting((), resumable=True)
    model: str = setting("")
    api_key_env: str = setting("", resumable=True)
    timeout_s: float = setting(120.0, minimum=0.0, maximum=3600.0, low_open=True, resumable=True)
    max_retries: int = setting(3, minimum=0, resumable=True)
    concurrency: int = setting(32, minimum=1, resumable=True)
    temperature: float = setting(0.0, minimum=0.0, maximum=10.0)
    top_p: float = setting(1.0, minimum=0.0, maximum=1.0, low_open=True)
    num_samples: int = setting(1, minimum=1)
    max_new_tokens: int = setting(8192, minimum=1)
    hf_path: str = setting("")
    mode: str = setting("pairwise", choices="judge_modes")
    swap_positions: bool = setting(False)
    condition_on: str = setting("prompt", choices="judge_conditions")
    attacker_judge: bool = setting(True)
    defender_judge: bool = setting(True)
    num_faith_samples: int = setting(1, minimum=1)
    faith_tie: str = setting("bad_judge", choices="faith_ties")
    max_in_flight_per_endpoint: int = setting(0, minimum=0, resumable=True)
    unhealthy_after: int = setting(3, minimum=1, resumable=True)
    unhealthy_cooldown_s: float = setting(30.0, minimum=0.0, maximum=1e9, resumable=True)
    warn_failure_rate: float = setting(0.1, minimum=0.0, maximum=1.0, resumable=True)
    warn_every: int = setting(10, minimum=1, resumable=True)
    explicit_sampling: bool = setting(True, added=False)


@dataclasses.dataclass(frozen=True)
class GameSettings:
    """``game``: the tree's shape, templates, output formats and selection rules.

    After conversion ``templates`` is the set actually used: the name registered from
    ``templates_file`` when that is set."""

    num_attacks: int = setting(2, minimum=1)
    num_responses: int = setting(2, minimum=1)
    templates: str = setting("advgame_v1", choices="template_sets")
    templates_file: str = setting("")
    attacker_format: str = setting("think_prompt_strict", choices="formats")
    defender_format: str = setting("any", choices="formats")
    optimistic_attacker: bool = setting(True)
    faithfulness: bool = setting(True)
    selection: str = setting("fallback", choices="selections")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """``sampling``: the players' shared decoding parameters."""

    temperature: float = setting(0.6, minimum=0.0, maximum=10.0)
    top_p: float = setting(0.9, minimum=0.0, maximum=1.0, low_open=True)
    top_k: int = setting(0, minimum=0)
    max_new_tokens: int = setting(2048, minimum=1)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """``loss``: the objective and its coefficients."""

    kind: str = setting("dpo", choices="objectives")
    beta: float = setting(0.1, minimum=0.0, maximum=1e3, low_open=True)
    length_normalization: bool = setting(False)
    nll_coef: float = setting(0.0, minimum=0.0, maximum=1e6)
    entropy_coef: float = setting(0.0, minimum=-1e6, maximum=1e6)
    kl_coef: float = setting(0.1, minimum=0.0, maximum=1e6)
    tis_cap: float = setting(2.0, minimum=0.0, maximum=1e9)  # 0 disables
    tis_detach: bool = setting(True)
    grpo_baseline: str = setting("across_seeds", choices="grpo_baselines")


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """``optim``: AdamW, clipping and the learning-rate schedule (training/optimizer.py)."""

    lr: float = setting(1e-6, minimum=0.0, maximum=1.0, low_open=True)
    b1: float = setting(0.9, minimum=0.0, maximum=1.0)
    b2: float = setting(0.95, minimum=0.0, maximum=1.0)
    weight_decay: float = setting(0.1, minimum=0.0, maximum=10.0)
    clip_norm: float = setting(1.0, minimum=0.0, maximum=1e6, low_open=True)
    final_lr_fraction: float = setting(0.2, minimum=0.0, maximum=1.0)
    warmup_steps: int = setting(0, minimum=0)
    lr_schedule: str = setting("run", choices="lr_schedules")
    mu_dtype: str = setting("float32", choices="dtypes")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """``train``: the run's length, batch, EMA, cadences and the update step's scale.

    ``remat_policy`` is the one field for rematerialisation (``"none"`` turns it off); the older
    ``remat`` boolean is translated by the converter."""

    num_steps: int = setting(1000, minimum=1)
    seeds_per_device: int = setting(4, minimum=1)
    seeds_per_step: int = setting(0, minimum=0, added=0)
    ema_decay: float = setting(0.95, minimum=0.0, maximum=1.0)
    sample_from: str = setting("ema", choices="sample_from")
    reference: str = setting("ema", choices="references")
    sync_every_n_steps: int = setting(1, minimum=1)
    num_microbatches: int = setting(1, minimum=1)
    loss_normalization: str = setting("pairs", choices="normalizations")
    norm_seeds_per_microbatch: int = setting(1, minimum=1)
    step_on_empty_batch: bool = setting(False)
    pair_buckets: tuple[int, ...] = setting((), minimum=1)
    length_buckets: tuple[int, ...] = setting((), minimum=1)
    logprob_chunk_size: int = setting(1024, minimum=1, resumable=True)
    validate_every: int = setting(25, minimum=0, resumable=True)
    checkpoint_every: int = setting(50, minimum=0, resumable=True)
    keep_checkpoints: int = setting(3, minimum=1, resumable=True)
    log_every: int = setting(1, minimum=1, resumable=True)
    attention: str = setting("auto", choices="attention", resumable=True)
    remat_policy: str = setting("full", choices="remat_policies", resumable=True)
    max_tokens_per_device: int = setting(8192, minimum=0, resumable=True)
    ema_dtype: str = setting("float32", choices="dtypes")

    def seeds_per_split(self, data_parallel_devices: int, num_processes: int = 1) -> int:
        """Global seeds per split per trainer step: ``seeds_per_step`` when set (the
        reference's fixed count, whatever the layout), else ``seeds_per_device`` × the
        data-parallel devices. Each of ``num_processes`` processes plays an equal share; a
        count that does not divide is refused naming the field."""
        fixed = self.seeds_per_step
        total = fixed or self.seeds_per_device * data_parallel_devices
        if total % num_processes:
            field = (
                f"config.train.seeds_per_step={fixed}"
                if fixed
                else f"config.train.seeds_per_device={self.seeds_per_device} × "
                f"{data_parallel_devices} data-parallel devices"
            )
            raise ConfigError(
                f"{field}: {total} seeds per split do not split over "
                f"{num_processes} processes; expected a multiple of "
                f"{num_processes} (each process plays an equal share)"
            )
        return total

    @property
    def keep_ema(self) -> bool:
        """Whether the run keeps an EMA copy (sampled from, or the loss reference)."""
        return self.sample_from == "ema" or self.reference == "ema"


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """``data``: seed JSONL files of the training and validation splits."""

    train_harmful: str = setting("")
    train_benign: str = setting("")
    valid_harmful: str = setting("", resumable=True)
    valid_benign: str = setting("", resumable=True)
    valid_adversarial_harmful: str = setting("", resumable=True)
    valid_adversarial_benign: str = setting("", resumable=True)
    adversarial_harmful: str = setting("")
    adversarial_benign: str = setting("")


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
    """``validation``: seeds per split (0 = all), responses, seeds per rollout call (0 = all)."""

    num_seeds: int = setting(64, minimum=0)
    num_responses: int = setting(2, minimum=1)
    batch_size: int = setting(64, minimum=0)


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    """``logging``: audit log, TensorBoard, Weights & Biases, progress bar."""

    audit_log: bool = setting(False)
    tensorboard: bool = setting(True)
    wandb_project: str = setting("")
    progress_bar: bool = setting(True)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The whole experiment: top-level fields and one section per block of ``experiment/configs/base.py``."""

    name: str = setting("advgame", resumable=True)
    workdir: str = setting("", resumable=True)
    seed: int = setting(0, minimum=0)
    toy_world: bool = setting(False)
    toy_warmup_steps: int = setting(300, minimum=0)
    toy_dir: str = setting("", resumable=True)
    init_from: str = setting("", added="")
    mesh: MeshSettings = section(MeshSettings, resumable=True)
    distributed: DistributedSettings = section(DistributedSettings, resumable=True)
    placement: MemoryPlanSettings = section(MemoryPlanSettings, resumable=True)
    attacker: PlayerSettings = dataclasses.field(
        default_factory=lambda: PlayerSettings(role="attacker"), metadata=dict(section=True)
    )
    defender: PlayerSettings = dataclasses.field(
        default_factory=lambda: PlayerSettings(role="defender"), metadata=dict(section=True)
    )
    judge: JudgeSettings = section(JudgeSettings)
    game: GameSettings = section(GameSettings)
    sampling: SamplingSettings = section(SamplingSettings)
    loss: LossSettings = section(LossSettings)
    optim: OptimSettings = section(OptimSettings)
    train: TrainSettings = section(TrainSettings)
    data: DataSettings = section(DataSettings)
    validation: ValidationSettings = section(ValidationSettings, resumable=True)
    logging: LoggingSettings = section(LoggingSettings, resumable=True)

    def player(self, role: str) -> PlayerSettings:
        if role not in ROLES:
            raise KeyError(f"no player {role!r}; expected one of {ROLES}")
        return getattr(self, role)

    def max_new_tokens(self, role: str) -> int:
        """``<role>.max_new_tokens``, or ``sampling.max_new_tokens`` when that is 0."""
        return self.player(role).max_new_tokens or self.sampling.max_new_tokens

    def to_dict(self) -> dict:
        """Plain nested dict (tuples kept), in the layout of ``experiment/configs/base.py``."""
        return dataclasses.asdict(self)


def resolve_placement(placement: str, sampler=None) -> str:
    """The placement of a player whose config may still carry the older ``sampler`` field
    (``'jax'`` | ``'vllm'``, None when absent): ``placement=''`` takes the sampler's meaning
    (``'jax'`` → ``'jax'``, ``'vllm'`` → ``'colocated'``); ``sampler='vllm'`` turns the
    default ``'jax'`` placement into ``'colocated'`` (to run such a config on the JAX sampler,
    set ``sampler='jax'`` too, or drop it); any other placement decides alone."""
    if sampler == "vllm" and placement in ("", "jax"):
        return "colocated"
    return placement or "jax"


# ------------------------------------------------------------------ field metadata


def walk_fields(cls=Settings, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, bool]]:
    """``(dotted name, field, is_section)`` for every field below ``cls``, depth first."""
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        if f.metadata.get("section"):
            yield dotted, f, True
            yield from walk_fields(_section_type(cls, f), dotted + ".")
        else:
            yield dotted, f, False


def _section_type(cls, f: dataclasses.Field):
    default = f.default_factory()  # type: ignore[misc]
    return type(default)


def resumable_fields(cls=Settings) -> tuple[str, ...]:
    """Dotted fields (or whole sections) marked ``resumable``, outermost only."""
    out: list[str] = []
    for dotted, f, _ in walk_fields(cls):
        if f.metadata.get("resumable") and not any(dotted.startswith(o + ".") for o in out):
            out.append(dotted)
    return tuple(out)


def added_fields(cls=Settings) -> dict[str, Any]:
    """Dotted field -> the value that computes what code older than the field did."""
    return {
        dotted: f.metadata["added"] for dotted, f, _ in walk_fields(cls) if "added" in f.metadata
    }
