"""The one conversion of an experiment config into typed :class:`~advgame_jax.settings.Settings`.

``settings_from_config`` reads the ConfigDict of a ``configs/*.py`` file (after command-line
overrides such as ``--config.train.num_steps=10``) once, at start-up, and either returns a
frozen ``Settings`` tree or raises one ``ConfigError`` naming the field
(``config.game.num_attacks``) and what was expected: an unknown field, a wrong type, a value
outside its range, a name missing from the registry that defines it (objectives, template
sets, placements, judge backends, attention kernels, remat policies, …), or two fields that
disagree. What each field accepts is declared on the field in ``advgame_jax/settings.py``;
this module holds only the checks that involve several fields, the user input a run needs
(``complete=True``) and the older field names it still reads:

* ``<role>.sampler`` (``'jax'`` | ``'vllm'``), the older name of ``<role>.placement``: see
  :func:`advgame_jax.settings.resolve_placement` (``'vllm'`` turns the default ``'jax'``
  placement into ``'colocated'``; an explicit ``'colocated'`` / ``'offloaded'`` decides);
* ``train.remat`` (bool): ``False`` is ``train.remat_policy='none'``; ``True`` keeps the
  policy. ``experiment/configs/base.py`` still carries it so older configs and
  ``--config.train.remat=False`` overrides keep working; nothing reads it after conversion.

File and endpoint checks that need more than the config (checkpoint directories, seed files,
reachable judges) live in the builders, which raise the same error type. Which fields a resumed
run may change is marked on the fields (``resumable`` / ``added``); ``RESUMABLE_FIELDS`` and
``ADDED_FIELDS`` below are computed from those marks.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Optional

from advgame_jax import settings as S
from advgame_jax.settings import ConfigError, Settings

__all__ = [
    "ADDED_FIELDS",
    "ConfigError",
    "LEGACY_FIELDS",
    "as_settings",
    "convert_section",
    "RESUMABLE_FIELDS",
    "Settings",
    "game_config_from_experiment",
    "registry",
    "seeds_per_split",
    "settings_from_config",
    "validate_config",
]

# Older field names still read (see the module docstring); a resumed run may change them.
LEGACY_FIELDS = {
    **{f"{r}.sampler": "the older name of placement ('jax' | 'vllm')" for r in S.ROLES},
    "train.remat": "the older switch of remat_policy (False = 'none')",
}

RESUMABLE_FIELDS: tuple[str, ...] = S.resumable_fields() + tuple(LEGACY_FIELDS)
ADDED_FIELDS: dict[str, Any] = S.added_fields()


# ------------------------------------------------------------------ registries


# Registry name (``settings.setting(choices=...)``) -> (module, attribute) of the names it
# holds, read from the module that defines them when first asked (a dict's keys are its names).
_REGISTRIES: dict[str, tuple[str, str]] = {
    "objectives": ("advgame_jax.training.objectives", "OBJECTIVES"),
    "placements": ("advgame_jax.sampling.placement", "PLACEMENTS"),
    "dtypes": ("advgame_jax.experiment.update_settings", "DTYPES"),
    "formats": ("advgame_jax.game.parsing", "FORMATS"),
    "faith_ties": ("advgame_jax.game.parsing", "FAITH_TIES"),
    "selections": ("advgame_jax.game.config", "SELECTIONS"),
    "judge_modes": ("advgame_jax.game.config", "JUDGE_MODES"),
    "judge_conditions": ("advgame_jax.game.config", "CONDITIONS"),
    "grpo_baselines": ("advgame_jax.game.rewards", "BASELINES"),
    "judge_backends": ("advgame_jax.game.factory", "BACKENDS"),
    "lr_schedules": ("advgame_jax.training.optimizer", "SCHEDULES"),
    "sample_from": ("advgame_jax.training.state", "SAMPLE_FROM"),
    "references": ("advgame_jax.training.state", "REFERENCES"),
    "normalizations": ("advgame_jax.game.normalization", "NORMALIZATIONS"),
    "attention": ("advgame_jax.models.attention", "ATTENTION_IMPLS"),
    "remat_policies": ("advgame_jax.models.transformer", "REMAT_POLICIES"),
}


def registry(name: str) -> tuple:
    """The names a registry holds now (template sets grow when a file is loaded)."""
    if name == "template_sets":
        from advgame_jax.game.templates import available_template_sets

        return tuple(available_template_sets())
    module, attr = _REGISTRIES[name]
    return tuple(getattr(importlib.import_module(module), attr))


# ------------------------------------------------------------------ field conversion


def _is_node(value) -> bool:
    return hasattr(value, "keys") and hasattr(value, "__getitem__")


def _as_dict(node, dotted: str) -> dict:
    if not _is_node(node):
        raise ConfigError(f"config.{dotted}: expected a section of fields, got {node!r}")
    return {k: node[k] for k in node.keys()}


def _range_text(meta) -> str:
    lo, hi = meta["minimum"], meta["maximum"]
    extra = "".join(f" or {v!r}" for v in meta["also"])
    if hi is None:
        return f">= {lo}{extra}"
    return f"in {'(' if meta['low_open'] else '['}{lo}, {hi}]{extra}"


def _in_range(value, meta) -> bool:
    if value in meta["also"]:
        return True
    lo, hi = meta["minimum"], meta["maximum"]
    if lo is not None and (value <= lo if meta["low_open"] else value < lo):
        return False
    return hi is None or value <= hi


def _convert_value(kind: str, value, meta, name: str):
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected True or False, got {value!r}")
        return value
    if kind in ("int", "float"):
        ok = not isinstance(value, bool) and isinstance(
            value, (int, float) if kind == "float" else int
        )
        if not ok:
            what = "an integer" if kind == "int" else "a number"
            raise ConfigError(
                f"{name}: expected {what} {_range_text(meta)}, got {value!r}"
                if meta["minimum"] is not None
                else f"{name}: expected {what}, got {value!r}"
            )
        if meta["minimum"] is not None and not _in_range(value, meta):
            what = "an integer" if kind == "int" else "a value"
            raise ConfigError(f"{name}: expected {what} {_range_text(meta)}, got {value!r}")
        return int(value) if kind == "int" else float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        choices = meta["choices"]
        if choices is not None:
            allowed = registry(choices) if isinstance(choices, str) else tuple(choices)
            if value not in allowed:
                raise ConfigError(f"{name}: expected one of {allowed}, got {value!r}")
        return value
    if kind.startswith("tuple["):
        item = kind[len("tuple[") :].split(",")[0].strip()
        if isinstance(value, str):  # a command-line list: 'a,b'
            value = tuple(v for v in value.split(",") if v)
            if item == "int":
                try:
                    value = tuple(int(v) for v in value)
                except ValueError:
                    raise ConfigError(f"{name}: expected integers, got {value!r}") from None
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{name}: expected a tuple, got {value!r}")
        item_meta = dict(meta, choices=None)
        return tuple(
            _convert_value(item, v, item_meta, f"{name}[{i}]") for i, v in enumerate(value)
        )
    raise TypeError(f"settings field {name} has an unsupported type {kind!r}")  # a bug


def convert_section(cls, node, dotted: str):
    """``cls`` (a settings dataclass) from the mapping ``node`` at ``config.<dotted>``: every
    field of ``node`` must be one of ``cls``; missing fields take the field's default."""
    values = _as_dict(node, dotted) if dotted else node
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"config.{dotted}." if dotted else "config."
        raise ConfigError(f"{where}{unknown[0]}: unknown field; expected one of {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue  # a config written before the field existed: the field's default
        name = f"config.{dotted}.{f.name}" if dotted else f"config.{f.name}"
        if f.metadata.get("section"):
            sub_cls = type(f.default_factory())  # type: ignore[misc]
            kwargs[f.name] = convert_section(sub_cls, values[f.name], name[len("config.") :])
        else:
            kwargs[f.name] = _convert_value(str(f.type), values[f.name], f.metadata, name)
    return cls(**kwargs)


# ------------------------------------------------------------------ the older field names


def _player_dict(node, role: str) -> tuple[dict, bool]:
    """``config.<role>`` as a dict in today's fields; True when the placement came from the
    older ``sampler`` field (a colocated engine without an explicit memory plan)."""
    d = _as_dict(node, role)
    sampler = d.pop("sampler", None)
    if sampler is not None and sampler not in ("jax", "vllm"):
        raise ConfigError(
            f"config.{role}.sampler: expected one of ('jax', 'vllm') (the older "
            f"name of config.{role}.placement), got {sampler!r}"
        )
    placement = d.get("placement", "jax")
    if not isinstance(placement, str):
        raise ConfigError(
            f"config.{role}.placement: expected one of {registry('placements')}, got {placement!r}"
        )
    d["placement"] = S.resolve_placement(placement, sampler)
    d.setdefault("role", role)
    if d["role"] != role:
        raise ConfigError(f"config.{role}.role: expected {role!r}, got {d['role']!r}")
    return d, sampler == "vllm" and placement in ("", "jax")


def _train_dict(node) -> dict:
    d = _as_dict(node, "train")
    remat = d.pop("remat", True)
    if not isinstance(remat, bool):
        raise ConfigError(
            f"config.train.remat: expected True or False (the older switch of "
            f"config.train.remat_policy), got {remat!r}"
        )
    if not remat:
        d["remat_policy"] = "none"
    return d


def _load_templates_file(game: dict) -> None:
    path = game.get("templates_file", "")
    if not path:
        return
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ConfigError(
            f"config.game.templates_file: {path!r} is not a file; expected "
            "a template file in the '=== key ===' format (docs/game.md)"
        )
    from advgame_jax.game.templates import TemplateError, load_template_file

    try:
        game["templates"] = load_template_file(path).name  # registered; used instead
    except TemplateError as err:
        raise ConfigError(f"config.game.templates_file: {err}") from None


# ------------------------------------------------------------------ the conversion


def settings_from_config(config, *, complete: bool = True) -> Settings:
    """The ``Settings`` of an experiment ConfigDict (or any nested mapping of its fields).

    ``complete``: also require the user input a run needs (workdir, checkpoints, judge
    endpoints, seed files, the API key variable); ``False`` for tools that only read the
    config (planning, tests of one section)."""
    top = _as_dict(config, "")
    legacy_colocated = {}
    for role in S.ROLES:
        if role in top:
            top[role], legacy_colocated[role] = _player_dict(top[role], role)
    if "train" in top:
        top["train"] = _train_dict(top["train"])
    if "game" in top:
        top["game"] = _as_dict(top["game"], "game")
        _load_templates_file(top["game"])
    s = convert_section(Settings, top, "")
    _check_together(s, legacy_colocated)
    if complete:
        _check_complete(s)
    return s


def as_settings(config) -> Settings:
    """``config`` if it is already the converted ``Settings``, else its conversion without the
    run's user input (for tools and tests that hold a ConfigDict)."""
    if isinstance(config, Settings):
        return config
    return settings_from_config(config, complete=False)


def validate_config(config) -> Settings:
    """Raise ``ConfigError`` on the first invalid field of ``config``; the ``Settings`` else."""
    return settings_from_config(config)


def _check_together(s: Settings, legacy_colocated: dict) -> None:
    """Checks that involve several fields."""
    if s.judge.backend == "endpoint":
        for e in s.judge.endpoints:
            if not e.startswith(("http://", "https://")):
                raise ConfigError(f"config.judge.endpoints: expected http(s):// URLs, got {e!r}")
    if s.loss.kind in ("dpo", "ipo"):
        a, d = s.game.num_attacks, s.game.num_responses
        if s.attacker.trainable and a < 2:
            raise ConfigError(
                f"config.game.num_attacks: {s.loss.kind} needs >= 2 attacks per "
                f"seed to form attacker pairs, got {a}"
            )
        if s.defender.trainable and d < 2:
            raise ConfigError(
                f"config.game.num_responses: {s.loss.kind} needs >= 2 responses "
                f"per attack to form defender pairs, got {d}"
            )
    if s.train.sample_from == "ema" and s.train.ema_decay >= 1.0:
        raise ConfigError(
            "config.train.ema_decay: sampling from an EMA with decay 1.0 never learns"
        )
    _check_placements(s, legacy_colocated)


def _check_placements(s: Settings, legacy_colocated: dict) -> None:
    """Engine addresses and the colocated memory plan (docs/sampling.md)."""
    colocated = {}
    for role in S.ROLES:
        p, e = s.player(role).placement, s.player(role).engine
        if e.address and p != "offloaded":
            raise ConfigError(
                f"config.{role}.engine.address is set but placement is {p!r}; "
                f"a user-started engine needs placement='offloaded'"
            )
        if e.address and (":" not in e.address or not e.address.rpartition(":")[2].isdigit()):
            raise ConfigError(
                f"config.{role}.engine.address: expected 'host:port', got {e.address!r}"
            )
        if p == "colocated":
            if legacy_colocated.get(role) and e.gpu_memory_utilization <= 0:
                continue  # older sampler='vllm' without a plan: vLLM's defaults, unchecked
            if e.gpu_memory_utilization <= 0:
                raise ConfigError(
                    f"config.{role}.engine.gpu_memory_utilization: a colocated engine needs an "
                    f"explicit share of each device (e.g. 0.3), got {e.gpu_memory_utilization}"
                )
            colocated[role] = e.gpu_memory_utilization
    if not colocated:
        return
    jax_frac, margin = s.placement.jax_memory_fraction, s.placement.device_memory_margin
    if jax_frac <= 0:
        raise ConfigError(
            "config.placement.jax_memory_fraction: colocated engines "
            f"({', '.join(colocated)}) share the trainer's devices, so JAX's share must be "
            "explicit (JAX preallocates 0.75 of each device by default), e.g. 0.5"
        )
    total = jax_frac + sum(colocated.values()) + margin
    if total > 1.0 + 1e-9:
        parts = " + ".join(
            [f"JAX {jax_frac:.2f}"]
            + [f"{r} engine {u:.2f}" for r, u in colocated.items()]
            + [f"margin {margin:.2f}"]
        )
        raise ConfigError(
            f"config.placement: colocated memory plan over-subscribes each device: {parts} = "
            f"{total:.2f} > 1.00 of device memory. Lower placement.jax_memory_fraction or "
            f"<role>.engine.gpu_memory_utilization, or use placement='offloaded'"
        )


def _check_complete(s: Settings) -> None:
    """The user input a run needs before anything is built."""
    if not s.workdir:
        raise ConfigError(
            "config.workdir: expected a directory path for checkpoints and metrics, got ''"
        )
    for role in S.ROLES:
        if not s.toy_world and not s.player(role).hf_path:
            raise ConfigError(
                f"config.{role}.hf_path: expected a local Hugging Face checkpoint directory "
                f"(pass --config.{role}.hf_path=/path/to/model)"
            )
    j = s.judge
    if j.backend == "endpoint":
        if not j.endpoints:
            raise ConfigError(
                "config.judge.endpoints: expected one or more OpenAI-compatible base "
                "URLs (e.g. --config.judge.endpoints=http://host:8000/v1)"
            )
        if not j.model:
            raise ConfigError("config.judge.model: expected the model name served at the endpoint")
        if j.api_key_env and j.api_key_env not in os.environ:
            raise ConfigError(
                f"config.judge.api_key_env: environment variable {j.api_key_env!r} is not set"
            )
    if j.backend == "sampler" and not j.hf_path:
        raise ConfigError(
            "config.judge.hf_path: expected a local judge checkpoint for backend='sampler'"
        )
    for split in ("train_harmful", "train_benign"):
        if not s.toy_world and not getattr(s.data, split):
            raise ConfigError(
                f"config.data.{split}: expected a seed JSONL file (see launch/prepare_data.py)"
            )


# ------------------------------------------------------------------ for ConfigDict readers


def _train_of(config) -> S.TrainSettings:
    if isinstance(config, Settings):
        return config.train
    return convert_section(S.TrainSettings, _train_dict(config.train), "train")


def seeds_per_split(config, data_parallel_devices: int, num_processes: int = 1) -> int:
    """``TrainSettings.seeds_per_split`` of a ``Settings`` or of a ConfigDict's train section."""
    return _train_of(config).seeds_per_split(data_parallel_devices, num_processes)


def game_config_from_experiment(config: Any, settings: Optional[Settings] = None):
    """The ``game.GameConfig`` of an experiment config (converted without requiring the run's
    user input, unless ``settings`` is given)."""
    from advgame_jax.game.config import game_config_from

    s = settings if settings is not None else settings_from_config(config, complete=False)
    return game_config_from(
        s.game,
        s.judge,
        s.sampling,
        seed=s.seed,
        max_new_tokens={r: s.max_new_tokens(r) for r in S.ROLES},
    )
