"""The typed settings: every shipped config converts into sections that hold exactly the
ConfigDict's values; base.py's defaults are the sections' defaults; bad fields stop the
conversion naming ``config.<section>.<field>`` and what was expected, enumerations read from
the registries that define them; the older field names translate as documented; resumable
and added-later fields are marked on the fields; and no module below ``experiment/`` imports
ml_collections or reads a ConfigDict (they take typed sections or plain arguments)."""

import ast
import dataclasses
import glob
import importlib.util
import os

import pytest

from advgame_jax import settings as S
from advgame_jax.experiment.validate import (
    ADDED_FIELDS,
    RESUMABLE_FIELDS,
    ConfigError,
    registry,
    seeds_per_split,
    settings_from_config,
)
from advgame_jax.training.checkpoint import config_differences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if os.path.basename(p) not in ("__init__.py", "base.py", "paper.py")
)
LEGACY = {"attacker.sampler", "defender.sampler", "train.remat"}


def _load(path, arg=None):
    spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def _leaves(node, prefix=""):
    for k in node.keys():
        v = node[k]
        if hasattr(v, "keys"):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _all_configs():
    from advgame_jax.experiment.configs.paper import ABLATIONS, FAMILIES, LOSSES, paper_config

    out = {os.path.relpath(p, ROOT): _load(p) for p in CONFIG_FILES}
    for fam in FAMILIES:  # every row of the paper table, both families
        for loss in LOSSES:
            out[f"paper:{fam}/{loss}"] = paper_config(fam, loss)
        for abl in ABLATIONS:
            out[f"paper:{fam}/dpo_md/{abl}"] = paper_config(fam, "dpo_md", abl)
    return out


def test_every_config_builds_into_sections_holding_its_values():
    configs = _all_configs()
    assert len(configs) >= 30
    for name, c in configs.items():
        s = settings_from_config(c, complete=False)
        assert isinstance(s.optim, S.OptimSettings) and isinstance(
            s.attacker.engine, S.EngineSettings
        )
        for dotted, value in _leaves(c):
            if dotted in LEGACY:
                continue
            got = _get(s, dotted)
            want = tuple(value) if isinstance(value, list) else value
            assert (
                got == want
                and type(got) is type(want)
                or (isinstance(want, int) and type(got) is float and got == want)
            ), (name, dotted)
        # The older fields agree with the canonical ones they were translated into.
        assert s.train.remat_policy == (
            "none" if not c.train.get("remat", True) else c.train.remat_policy
        ), name
        for role in S.ROLES:
            assert "sampler" not in c[role], (
                f"{name}: {role}.sampler is the older name of placement"
            )
            assert s.player(role).placement == c[role].placement
            assert s.player(role).role == role


def test_paper_configs_name_one_placement_and_one_remat_field():
    """The paper runs state where each sampler runs once (placement), never twice."""
    from advgame_jax.experiment.configs.paper import ABLATIONS, FAMILIES, LOSSES, REFERENCE

    for table in (REFERENCE, *FAMILIES.values(), *LOSSES.values(), *ABLATIONS.values()):
        assert not set(table) & LEGACY
    s = settings_from_config(_load(os.path.join(ROOT, "configs", "qwen_dpo_md.py")), complete=False)
    assert (s.attacker.placement, s.defender.placement) == ("offloaded", "offloaded")
    assert s.train.remat_policy == "full"


def test_base_defaults_are_the_sections_defaults():
    from advgame_jax.experiment.configs.base import base_config

    assert settings_from_config(base_config(), complete=False) == S.Settings()
    # And every field of the sections exists in base.py (nothing is defaulted only in code).
    names = {d for d, _ in _leaves(base_config())}
    fields = {d for d, _, is_section in S.walk_fields() if not is_section}
    assert fields <= names and names - fields == LEGACY - {"attacker.sampler", "defender.sampler"}


def test_sections_are_frozen():
    s = S.Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.optim.lr = 1.0  # type: ignore[misc]


def _tiny():
    return _load(os.path.join(ROOT, "configs", "tiny.py"))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("optim.lrr", 1e-5, r"config\.optim\.lrr: unknown field; expected one of \[.*'lr'"),
        ("attacker.engine.adress", "h:1", r"config\.attacker\.engine\.adress: unknown field"),
        ("tranin", {"a": 1}, r"config\.tranin: unknown field"),
        ("train.num_steps", "10", r"config\.train\.num_steps: expected an integer >= 1, got '10'"),
        ("train.num_steps", True, r"config\.train\.num_steps: expected an integer"),
        (
            "train.step_on_empty_batch",
            1,
            r"config\.train\.step_on_empty_batch: expected True or False",
        ),
        ("judge.temperature", "hot", r"config\.judge\.temperature: expected a number"),
        ("judge.max_new_tokens", 0, r"config\.judge\.max_new_tokens: expected an integer >= 1"),
        ("mesh.data", 0, r"config\.mesh\.data: expected an integer >= 1 or -1, got 0"),
        ("mesh.data", -1, None),
        (
            "train.pair_buckets",
            (32, 0),
            r"config\.train\.pair_buckets\[1\]: expected an integer >= 1",
        ),
        ("optim.b2", 1.5, r"config\.optim\.b2: expected a value in \[0\.0, 1\.0\]"),
        ("attacker.role", "defender", r"config\.attacker\.role: expected 'attacker'"),
        ("attacker.engine", 3, r"config\.attacker\.engine: expected a section of fields"),
        (
            "defender.placement",
            "gpu",
            r"config\.defender\.placement: expected one of \('jax', 'colocated', 'offloaded'\)",
        ),
    ],
)
def test_bad_fields_are_named(field, value, match):
    c = _tiny().to_dict()  # a plain mapping: ConfigDict's own type checks would stop some first
    node = c
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    if match is None:
        settings_from_config(c)
        return
    with pytest.raises(ConfigError, match=match):
        settings_from_config(c)


@pytest.mark.parametrize(
    "field,registry_name,module,attr",
    [
        ("loss.kind", "objectives", "advgame_jax.training.objectives", "OBJECTIVES"),
        ("train.attention", "attention", "advgame_jax.models.attention", "ATTENTION_IMPLS"),
        (
            "train.remat_policy",
            "remat_policies",
            "advgame_jax.models.transformer",
            "REMAT_POLICIES",
        ),
        ("game.attacker_format", "formats", "advgame_jax.game.parsing", "FORMATS"),
        ("judge.faith_tie", "faith_ties", "advgame_jax.game.parsing", "FAITH_TIES"),
        ("judge.backend", "judge_backends", "advgame_jax.game.factory", "BACKENDS"),
        ("loss.grpo_baseline", "grpo_baselines", "advgame_jax.game.rewards", "BASELINES"),
        (
            "train.loss_normalization",
            "normalizations",
            "advgame_jax.game.normalization",
            "NORMALIZATIONS",
        ),
        ("optim.lr_schedule", "lr_schedules", "advgame_jax.training.optimizer", "SCHEDULES"),
        ("attacker.placement", "placements", "advgame_jax.sampling.placement", "PLACEMENTS"),
    ],
)
def test_enumerations_come_from_their_registries(field, registry_name, module, attr):
    import importlib

    want = tuple(getattr(importlib.import_module(module), attr))
    assert registry(registry_name) == want
    meta = {d: f for d, f, _ in S.walk_fields()}[field].metadata
    assert meta["choices"] == registry_name
    c = _tiny()
    section, leaf = field.split(".")
    c[section][leaf] = "no-such-name"
    with pytest.raises(ConfigError) as e:
        settings_from_config(c)
    assert str(e.value) == f"config.{field}: expected one of {want}, got 'no-such-name'"


def test_template_sets_registry_grows_with_a_loaded_file(tmp_path):
    from advgame_jax.game.templates import get_template_set, template_set_to_text

    c = _tiny()
    c.game.templates = "my_set"
    with pytest.raises(ConfigError, match=r"config\.game\.templates: expected one of .*'my_set'"):
        settings_from_config(c)
    path = tmp_path / "my_set.txt"
    path.write_text(template_set_to_text(get_template_set("toy_v1")), encoding="utf-8")
    c.game.templates = "toy_v1"
    c.game.templates_file = str(path)
    s = settings_from_config(c)
    assert s.game.templates == "my_set" and "my_set" in registry("template_sets")


def test_older_field_names_translate_as_documented():
    c = _tiny()
    c.attacker.sampler = "vllm"  # older configs: vLLM inside the trainer
    c.defender.placement = ""  # older configs: '' = from `sampler` (absent: 'jax')
    c.train.remat = False
    c.train.remat_policy = "save_attn"
    s = settings_from_config(c)
    assert (s.attacker.placement, s.defender.placement, s.train.remat_policy) == (
        "colocated",
        "jax",
        "none",
    )
    c.attacker.placement = "offloaded"  # an explicit vLLM placement decides
    c.defender.sampler = "jax"
    c.defender.placement = "offloaded"
    c.train.remat = True
    s = settings_from_config(c)
    assert (s.attacker.placement, s.defender.placement, s.train.remat_policy) == (
        "offloaded",
        "offloaded",
        "save_attn",
    )
    c.attacker.sampler = "tgi"
    with pytest.raises(
        ConfigError, match=r"config\.attacker\.sampler: expected one of \('jax', 'vllm'\)"
    ):
        settings_from_config(c)
    c.attacker.sampler = "jax"
    d = c.to_dict()
    d["train"]["remat"] = "yes"
    with pytest.raises(ConfigError, match=r"config\.train\.remat: expected True or False"):
        settings_from_config(d)


def test_missing_user_input_is_required_only_for_a_run():
    c = _load(os.path.join(ROOT, "configs", "llama_grpo.py"))
    s = settings_from_config(c, complete=False)
    assert s.loss.kind == "grpo"
    with pytest.raises(ConfigError, match=r"config\.workdir"):
        settings_from_config(c)


# The lists the loop used before the marks moved onto the fields, value by value.
_OLD_RESUMABLE = {
    "name",
    "workdir",
    "toy_dir",
    "logging",
    "validation",
    "data.valid_harmful",
    "data.valid_benign",
    "data.valid_adversarial_harmful",
    "data.valid_adversarial_benign",
    "mesh",
    "distributed",
    "placement",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.validate_every",
    "train.log_every",
    "train.logprob_chunk_size",
    "train.remat",
    "train.remat_policy",
    "train.attention",
    "train.max_tokens_per_device",
    "judge.endpoints",
    "judge.api_key_env",
    "judge.timeout_s",
    "judge.max_retries",
    "judge.concurrency",
    "judge.max_in_flight_per_endpoint",
    "judge.unhealthy_after",
    "judge.unhealthy_cooldown_s",
    "judge.warn_failure_rate",
    "judge.warn_every",
    *(
        f"{r}.{f}"
        for r in ("attacker", "defender")
        for f in (
            "sampler",
            "sampler_dtype",
            "sampler_min_batch_bucket",
            "sampler_min_prompt_bucket",
            "vllm_kv_cache_bytes",
            "vllm_max_model_len",
            "placement",
            "engine",
        )
    ),
}
_OLD_ADDED = {
    "init_from": "",
    "train.seeds_per_step": 0,
    "attacker.max_new_tokens": 0,
    "defender.max_new_tokens": 0,
    "judge.explicit_sampling": False,
}


def test_resume_marks_on_the_fields_keep_the_resume_rules():
    assert set(RESUMABLE_FIELDS) == _OLD_RESUMABLE and len(RESUMABLE_FIELDS) == len(_OLD_RESUMABLE)
    assert ADDED_FIELDS == _OLD_ADDED
    meta = {d: f.metadata for d, f, _ in S.walk_fields()}
    assert meta["train.checkpoint_every"]["resumable"] and not meta["loss.beta"]["resumable"]
    assert meta["attacker.engine"]["resumable"] and meta["attacker.engine"]["section"]
    # What the loop compares: a saved config against the current one.
    import json

    saved = json.loads(_tiny().to_json())
    now = _tiny()
    now.train.checkpoint_every = 7
    now.attacker.engine.devices = "8,9"
    now.defender.sampler = "jax"  # an older field, present in one run only
    assert (
        config_differences(
            saved, json.loads(now.to_json()), ignore=RESUMABLE_FIELDS, added=ADDED_FIELDS
        )
        == []
    )
    now.loss.beta = 0.2
    assert config_differences(
        saved, json.loads(now.to_json()), ignore=RESUMABLE_FIELDS, added=ADDED_FIELDS
    ) == ["config.loss.beta: 0.1 in the checkpoint, 0.2 now"]


def test_seeds_per_split_reads_settings_and_configdicts_alike():
    from advgame_jax.experiment.configs.paper import paper_config

    c = paper_config("qwen", "dpo_md", "none")
    s = settings_from_config(c, complete=False)
    assert (
        seeds_per_split(c, 8, 4) == seeds_per_split(s, 8, 4) == s.train.seeds_per_split(8, 4) == 32
    )


# ------------------------------------------------------------------ who still reads a ConfigDict

_SECTION_NAMES = {
    "mesh",
    "distributed",
    "placement",
    "attacker",
    "defender",
    "judge",
    "game",
    "sampling",
    "loss",
    "optim",
    "train",
    "data",
    "validation",
    "logging",
    "workdir",
    "toy_world",
    "toy_dir",
    "init_from",
}
_CONFIG_PARAMS = {"config", "cfg", "conf", "judge_config", "experiment_config", "optim"}
# Names read as a ConfigDict wherever they appear (not only as parameters).
_CONFIG_NAMES = {"config", "judge_config", "experiment_config"}


def _imports_ml_collections(n) -> bool:
    if isinstance(n, ast.Import):
        return any(a.name.split(".")[0] == "ml_collections" for a in n.names)
    return isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "ml_collections"


def _reads_as_configdict(node, name: str, sections: bool = True) -> bool:
    """``name.get`` / ``.keys`` / ``.to_json``, ``name[...]`` or (``sections``) a section
    attribute ``name.train`` … in ``node``."""
    attrs = {"get", "keys", "to_json"} | (_SECTION_NAMES if sections else set())
    for m in ast.walk(node):
        if (
            isinstance(m, ast.Attribute)
            and isinstance(m.value, ast.Name)
            and m.value.id == name
            and m.attr in attrs
        ) or (
            isinstance(m, ast.Subscript) and isinstance(m.value, ast.Name) and m.value.id == name
        ):
            return True
    return False


def _untyped(ann) -> bool:
    return (
        ann is None
        or (isinstance(ann, ast.Name) and ann.id == "Any")
        or (isinstance(ann, ast.Constant) and ann.value == "Any")
    )


def _function_reasons(n) -> set:
    """A parameter typed as a ConfigDict, or an un-typed ``config``-like parameter that the
    function reads as one."""
    why = set()
    for a in n.args.posonlyargs + n.args.args + n.args.kwonlyargs:
        if a.annotation is not None and "ConfigDict" in ast.unparse(a.annotation):
            why.add(f"{n.name}({a.arg}: ConfigDict)")
        elif a.arg in _CONFIG_PARAMS and _untyped(a.annotation) and _reads_as_configdict(n, a.arg):
            why.add(f"{n.name}({a.arg})")
    if n.returns is not None and "ConfigDict" in ast.unparse(n.returns):
        why.add(f"{n.name} -> ConfigDict")
    return why


def config_readers(sources: dict) -> dict:
    """Module -> reasons, for modules that import ml_collections; have a parameter, variable
    or return value annotated as a ConfigDict; have a function taking an un-typed
    ``config``-like parameter that reads it as a ConfigDict (a section attribute, ``.get`` /
    ``.keys`` / ``.to_json``, or ``param[...]``); or read anything named ``config`` that way."""
    out = {}
    for rel, text in sources.items():
        why = set()
        for n in ast.walk(ast.parse(text)):
            if _imports_ml_collections(n):
                why.add("imports ml_collections")
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                why |= _function_reasons(n)
            elif isinstance(n, ast.AnnAssign) and "ConfigDict" in ast.unparse(n.annotation):
                why.add(f"{ast.unparse(n.target)}: ConfigDict")
            elif isinstance(n, ast.Module):
                why |= {
                    f"reads {c} as a ConfigDict"
                    for c in _CONFIG_NAMES
                    if _reads_as_configdict(n, c, sections=False)
                }
        if why:
            out[rel] = sorted(why)
    return out


def _library_sources() -> dict:
    out = {}
    for path in glob.glob(os.path.join(ROOT, "advgame_jax", "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        if rel.startswith("advgame_jax/experiment/"):
            continue
        with open(path, encoding="utf-8") as f:
            out[rel] = f.read()
    return out


def test_no_module_below_experiment_reads_a_configdict():
    """Everything below ``experiment/`` takes its typed section (``advgame_jax.settings``) or
    plain arguments; only ``experiment/`` (the converter and the assembly) sees the ConfigDict.
    Eight modules read it before the typed settings, none now."""
    readers = config_readers(_library_sources())
    assert readers == {}, readers


def test_the_reader_scan_finds_what_it_looks_for():
    found = config_readers(
        {
            "a.py": "import ml_collections\n",
            "b.py": "def f(config):\n    return config.train.num_steps\n",
            "c.py": "def f(optim):\n    return optim.get('lr')\n",
            "d.py": "def f(config, role):\n    return config[role]\n",
            "e.py": "def f(config: ModelConfig):\n    return config.train\n",
            "f.py": "def f(optim: OptimSettings):\n    return optim.lr\n",
            "g.py": "def f(config):\n    return config.hidden_size\n",
            "h.py": "def f(c: ml_collections.ConfigDict):\n    return c.x\n",
            "i.py": "def f(c) -> 'ConfigDict':\n    return c\n",
            "j.py": "def f(s):\n    return g(config.get('a'))\n",
            "k.py": "from ml_collections.config_dict import ConfigDict\n",
            "l.py": "c: ConfigDict = make()\n",
            "m.py": "def f(settings: Settings):\n    return settings.train, settings.mesh\n",
            "n.py": "def f(path):\n    cfg = load(path)\n    return cfg.get('eos_token_id')\n",
        }
    )
    assert sorted(found) == ["a.py", "b.py", "c.py", "d.py", "h.py", "i.py", "j.py", "k.py", "l.py"]
    assert found["j.py"] == ["reads config as a ConfigDict"]
