"""Validation of an experiment config before anything is built.

``validate_config`` checks every field that a typo or an inconsistent override could break and
raises one ``ConfigError`` naming the field (``config.game.num_attacks``) and what was
expected. File and endpoint checks that need I/O live in the builders, which raise the same
error type. ``RESUMABLE_FIELDS`` lists the fields a resumed run may change; the loop refuses
a checkpoint whose saved config differs anywhere else.
"""

from __future__ import annotations

from advgame_jax.errors import UserError
import os
from typing import Any, Iterable


class ConfigError(UserError, ValueError):
    """A config field is missing, malformed or inconsistent with another field."""


def _get(config, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(f"config.{dotted}: field is missing") from None
    return node


def _one_of(config, dotted: str, allowed: Iterable[str]) -> str:
    value = _get(config, dotted)
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"config.{dotted}: expected one of {allowed}, got {value!r}")
    return value


def _int(config, dotted: str, *, minimum: int) -> int:
    value = _get(config, dotted)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config.{dotted}: expected an integer >= {minimum}, got {value!r}")
    return value


def _float(config, dotted: str, *, low: float, high: float, low_open=False) -> float:
    value = _get(config, dotted)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.{dotted}: expected a number, got {value!r}")
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"config.{dotted}: expected a value in {bracket}{low}, {high}], got {value!r}")
    return float(value)


DTYPES = ("float32", "bfloat16")

# Config fields that may differ between a checkpoint and the run resuming it: where things
# are written, how often, logging, validation, judge transport and sampler engine. Any
# other difference refuses the resume (the state or the training semantics would change).
RESUMABLE_FIELDS = (
    "name", "workdir", "toy_dir", "logging", "validation", "data.valid_harmful",
    "data.valid_benign", "data.valid_adversarial_harmful", "data.valid_adversarial_benign",
    # Where and how things run, not what the game computes: devices, processes, engines.
    "mesh", "distributed", "placement",
    "train.checkpoint_every", "train.keep_checkpoints", "train.validate_every",
    "train.log_every", "train.logprob_chunk_size", "train.remat", "train.remat_policy",
    "train.attention", "train.max_tokens_per_device",
    "judge.endpoints", "judge.api_key_env", "judge.timeout_s", "judge.max_retries",
    "judge.concurrency", "judge.max_in_flight_per_endpoint", "judge.unhealthy_after",
    "judge.unhealthy_cooldown_s", "judge.warn_failure_rate", "judge.warn_every",
    *(f"{r}.{f}" for r in ("attacker", "defender") for f in (
        "sampler", "sampler_dtype", "sampler_min_batch_bucket", "sampler_min_prompt_bucket",
        "vllm_kv_cache_bytes", "vllm_max_model_len", "placement", "engine")),
)


# Fields added after checkpoints were first written, each with the value that computes what
# the older code did. A checkpoint saved before a field existed resumes when the field holds
# that value now (any other value is a change of the game and is refused, naming the field).
ADDED_FIELDS = {
    "init_from": "",
    "train.seeds_per_step": 0,
    "attacker.max_new_tokens": 0,
    "defender.max_new_tokens": 0,
    "judge.explicit_sampling": False,
}


def seeds_per_split(config, data_parallel_devices: int, num_processes: int = 1) -> int:
    """Global seeds per split per trainer step: ``train.seeds_per_step`` when set (the
    reference's fixed count, whatever the layout), else ``train.seeds_per_device`` × the
    data-parallel devices. Each of ``num_processes`` processes plays an equal share; a count
    that does not divide is refused naming the field."""
    fixed = int(config.train.get("seeds_per_step", 0) or 0)
    total = fixed or int(config.train.seeds_per_device) * data_parallel_devices
    if total % num_processes:
        field = (f"config.train.seeds_per_step={fixed}" if fixed else
                 f"config.train.seeds_per_device={config.train.seeds_per_device} × "
                 f"{data_parallel_devices} data-parallel devices")
        raise ConfigError(f"{field}: {total} seeds per split do not split over "
                          f"{num_processes} processes; expected a multiple of {num_processes} "
                          "(each process plays an equal share)")
    return total


def validate_config(config) -> None:
    """Raise ``ConfigError`` on the first invalid field of ``config`` (an ml_collections ConfigDict)."""
    if not _get(config, "workdir"):
        raise ConfigError("config.workdir: expected a directory path for checkpoints and metrics, got ''")
    _int(config, "seed", minimum=0)
    for axis in ("data", "fsdp", "tensor"):
        v = _get(config, f"mesh.{axis}")
        if not isinstance(v, int) or (v < 1 and v != -1):
            raise ConfigError(f"config.mesh.{axis}: expected a positive integer or -1, got {v!r}")
        if f"dcn_{axis}" in config.mesh:
            v = _get(config, f"mesh.dcn_{axis}")
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"config.mesh.dcn_{axis}: expected a positive integer, got {v!r}")

    toy = _get(config, "toy_world") if "toy_world" in config else False
    for role in ("attacker", "defender"):
        _one_of(config, f"{role}.sampler", ("jax", "vllm"))
        for f in ("param_dtype", "compute_dtype", "sampler_dtype"):
            _one_of(config, f"{role}.{f}", DTYPES)
        if not toy and not _get(config, f"{role}.hf_path"):
            raise ConfigError(
                f"config.{role}.hf_path: expected a local Hugging Face checkpoint directory "
                f"(pass --config.{role}.hf_path=/path/to/model)")
        _int(config, f"{role}.sampler_min_batch_bucket", minimum=1)
        _int(config, f"{role}.sampler_min_prompt_bucket", minimum=1)
        if "max_new_tokens" in config[role]:
            _int(config, f"{role}.max_new_tokens", minimum=0)
        if not isinstance(_get(config, f"{role}.trainable"), bool):
            raise ConfigError(f"config.{role}.trainable: expected True or False")

    backend = _one_of(config, "judge.backend", ("endpoint", "rule", "sampler"))
    if backend == "endpoint":
        endpoints = _get(config, "judge.endpoints")
        if isinstance(endpoints, str):
            endpoints = tuple(e for e in endpoints.split(",") if e)
        if not endpoints:
            raise ConfigError("config.judge.endpoints: expected one or more OpenAI-compatible base "
                              "URLs (e.g. --config.judge.endpoints=http://host:8000/v1)")
        for e in endpoints:
            if not str(e).startswith(("http://", "https://")):
                raise ConfigError(f"config.judge.endpoints: expected http(s):// URLs, got {e!r}")
        if not _get(config, "judge.model"):
            raise ConfigError("config.judge.model: expected the model name served at the endpoint")
        env = _get(config, "judge.api_key_env")
        if env and env not in os.environ:
            raise ConfigError(f"config.judge.api_key_env: environment variable {env!r} is not set")
    if backend == "sampler" and not _get(config, "judge.hf_path"):
        raise ConfigError("config.judge.hf_path: expected a local judge checkpoint for backend='sampler'")
    _one_of(config, "judge.mode", ("pairwise", "pointwise"))
    _one_of(config, "judge.condition_on", ("prompt", "seed"))
    _float(config, "judge.timeout_s", low=0.0, high=3600.0, low_open=True)
    _int(config, "judge.max_retries", minimum=0)
    _int(config, "judge.concurrency", minimum=1)
    _int(config, "judge.num_faith_samples", minimum=1)
    _float(config, "judge.temperature", low=0.0, high=10.0)
    _float(config, "judge.top_p", low=0.0, high=1.0, low_open=True)
    _int(config, "judge.num_samples", minimum=1)
    _one_of(config, "judge.faith_tie", ("bad_judge", "not_faithful"))
    _one_of(config, "game.selection", ("reference", "fallback"))
    templates_file = _get(config, "game.templates_file")
    if templates_file and not os.path.isfile(templates_file):
        raise ConfigError(f"config.game.templates_file: {templates_file!r} is not a file; expected "
                          "a template file in the '=== key ===' format (docs/game.md)")

    a = _int(config, "game.num_attacks", minimum=1)
    d = _int(config, "game.num_responses", minimum=1)
    _one_of(config, "game.attacker_format", ("think_prompt_strict", "prompt_strict", "any"))
    _one_of(config, "game.defender_format", ("think_prompt_strict", "prompt_strict", "any"))

    _float(config, "sampling.temperature", low=0.0, high=10.0)
    _float(config, "sampling.top_p", low=0.0, high=1.0, low_open=True)
    _int(config, "sampling.top_k", minimum=0)
    _int(config, "sampling.max_new_tokens", minimum=1)

    kind = _one_of(config, "loss.kind", ("dpo", "ipo", "grpo"))
    _float(config, "loss.beta", low=0.0, high=1e3, low_open=True)
    _one_of(config, "loss.grpo_baseline", ("across_seeds", "per_seed"))
    if not isinstance(_get(config, "loss.tis_detach"), bool):
        raise ConfigError("config.loss.tis_detach: expected True or False")
    if kind in ("dpo", "ipo"):
        if _get(config, "attacker.trainable") and a < 2:
            raise ConfigError(f"config.game.num_attacks: {kind} needs >= 2 attacks per seed to form "
                              f"attacker pairs, got {a}")
        if _get(config, "defender.trainable") and d < 2:
            raise ConfigError(f"config.game.num_responses: {kind} needs >= 2 responses per attack "
                              f"to form defender pairs, got {d}")

    _float(config, "optim.lr", low=0.0, high=1.0, low_open=True)
    _float(config, "optim.final_lr_fraction", low=0.0, high=1.0)
    _float(config, "optim.weight_decay", low=0.0, high=10.0)
    _float(config, "optim.clip_norm", low=0.0, high=1e6, low_open=True)
    _one_of(config, "optim.lr_schedule", ("run", "cycle"))

    _int(config, "train.num_steps", minimum=1)
    _int(config, "train.seeds_per_device", minimum=1)
    if "seeds_per_step" in config.train:  # configs written before the field read as 0
        _int(config, "train.seeds_per_step", minimum=0)
    _float(config, "train.ema_decay", low=0.0, high=1.0)
    sample_from = _one_of(config, "train.sample_from", ("ema", "trained"))
    _one_of(config, "train.reference", ("ema", "initial"))
    _int(config, "train.sync_every_n_steps", minimum=1)
    _int(config, "train.num_microbatches", minimum=1)
    _one_of(config, "train.loss_normalization", ("reference", "pairs"))
    _int(config, "train.norm_seeds_per_microbatch", minimum=1)
    if not isinstance(_get(config, "train.step_on_empty_batch"), bool):
        raise ConfigError("config.train.step_on_empty_batch: expected True or False")
    _one_of(config, "train.attention", ("auto", "xla", "chunked", "cudnn"))
    _one_of(config, "train.remat_policy", ("full", "dots_no_batch", "save_attn"))
    _int(config, "train.max_tokens_per_device", minimum=0)
    _one_of(config, "train.ema_dtype", DTYPES)
    _one_of(config, "optim.mu_dtype", DTYPES)
    _int(config, "train.validate_every", minimum=0)
    _int(config, "train.checkpoint_every", minimum=0)
    _int(config, "train.keep_checkpoints", minimum=1)
    if sample_from == "ema" and _get(config, "train.ema_decay") >= 1.0:
        raise ConfigError("config.train.ema_decay: sampling from an EMA with decay 1.0 never learns")

    for split in ("train_harmful", "train_benign"):
        if not toy and not _get(config, f"data.{split}"):
            raise ConfigError(f"config.data.{split}: expected a seed JSONL file "
                              f"(see launch/prepare_data.py)")
    _int(config, "validation.num_seeds", minimum=0)
    _int(config, "validation.num_responses", minimum=1)
    _int(config, "validation.batch_size", minimum=0)
    from advgame_jax.sampling.placement import validate_placement  # sampler placement / memory plan

    validate_placement(config)
