"""Every config file loads; validation names the offending field for bad values."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from advgame_jax.experiment.validate import ConfigError, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if os.path.basename(p) != "__init__.py"
)


def load(path, arg=None):
    spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def complete(c):
    """Fill the user-supplied fields of a paper config with plausible values."""
    c.workdir = "/tmp/advgame-test"
    c.attacker.hf_path = "/models/a"
    c.defender.hf_path = "/models/d"
    c.judge.endpoints = ("http://127.0.0.1:8000/v1",)
    c.data.train_harmful = "/data/h.jsonl"
    c.data.train_benign = "/data/b.jsonl"
    return c


def test_every_config_file_is_covered():
    names = {os.path.relpath(p, ROOT) for p in CONFIG_FILES}
    for fam in ("qwen", "llama"):
        for loss in ("dpo_md", "ipo_md", "grpo"):
            assert f"configs/{fam}_{loss}.py" in names
    for abl in (
        "no_ema",
        "pointwise_judge",
        "fixed_attacker",
        "no_attacker_judge",
        "non_optimistic",
        "no_think",
        "dpo_onpolicy",
        "small_judge",
        "grpo_pairwise_onpolicy",
        "grpo_pointwise_offpolicy",
    ):
        assert f"configs/ablations/{abl}.py" in names
    assert "configs/tiny.py" in names


def test_config_files_load_from_any_directory(tmp_path):
    """``--config=<file>`` needs no ``sys.path`` edit: each file imports only the package.
    Loaded by path from another directory, with neither the repository root nor configs/ on
    ``sys.path`` (the package is reached through a directory holding only a link to it)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "advgame_jax").symlink_to(os.path.join(ROOT, "advgame_jax"))
    script = (
        "import importlib.util, os, sys\n"
        f"root = {ROOT!r}\n"
        "assert not any(os.path.abspath(p or '.') == root for p in sys.path), sys.path\n"
        "for path in sys.argv[1:]:\n"
        "    spec = importlib.util.spec_from_file_location('cfg', path)\n"
        "    mod = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(mod)\n"
        "    assert mod.get_config().name, path\n"
        "assert 'configs' not in sys.modules\n"
        "print('loaded', len(sys.argv) - 1)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", script, *CONFIG_FILES],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["loaded", str(len(CONFIG_FILES))]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_loads_and_validates(path):
    c = load(path)
    if not c.get("toy_world", False):
        if not c.attacker.get("hf_path"):
            with pytest.raises(ConfigError, match="hf_path|workdir"):
                validate_config(c)  # paper configs need user paths first
        complete(c)
    validate_config(c)


def test_paper_table():
    """GAME_SPEC §3 rows, checked field by field."""
    c = load(os.path.join(ROOT, "configs", "qwen_dpo_md.py"))
    assert (c.loss.kind, c.judge.mode, c.game.num_attacks, c.game.num_responses) == (
        "dpo",
        "pairwise",
        2,
        2,
    )
    assert (c.train.sample_from, c.train.reference) == ("ema", "ema")
    assert (c.loss.beta, c.optim.lr, c.train.ema_decay) == (0.1, 1e-6, 0.95)
    assert (c.sampling.temperature, c.sampling.top_p, c.sampling.max_new_tokens) == (0.6, 0.9, 2048)
    assert (c.train.validate_every, c.train.checkpoint_every, c.train.num_steps) == (25, 50, 1000)
    assert (
        c.optim.b1,
        c.optim.b2,
        c.optim.weight_decay,
        c.optim.clip_norm,
        c.optim.final_lr_fraction,
    ) == (0.9, 0.95, 0.1, 1.0, 0.2)
    g = load(os.path.join(ROOT, "configs", "llama_grpo.py"))
    assert (g.loss.kind, g.judge.mode, g.game.num_attacks, g.game.num_responses) == (
        "grpo",
        "pointwise",
        4,
        4,
    )
    assert (g.train.sample_from, g.train.reference, g.loss.tis_cap) == ("trained", "initial", 2.0)
    i = load(os.path.join(ROOT, "configs", "llama_ipo_md.py"))
    assert i.loss.kind == "ipo" and i.train.reference == "ema"

    def abl(n, fam=None):
        return load(os.path.join(ROOT, "configs", "ablations", f"{n}.py"), fam)

    assert (abl("no_ema").train.sample_from, abl("no_ema").train.reference) == (
        "trained",
        "initial",
    )
    assert abl("pointwise_judge").judge.mode == "pointwise"
    assert abl("fixed_attacker").attacker.trainable is False
    assert abl("no_attacker_judge").judge.attacker_judge is False
    assert abl("non_optimistic").game.optimistic_attacker is False
    assert abl("no_think").game.attacker_format == "prompt_strict"
    assert abl("no_think", "llama").judge.model.startswith("Llama")


# The reference's paper configs (configs/paper/**.yaml of facebookresearch/advgame and the
# fairseq2 defaults they rely on), value by value. Dotted field -> value.
REFERENCE_VALUES = {
    "optim.lr": 1e-6,
    "optim.b1": 0.9,
    "optim.b2": 0.95,
    "optim.weight_decay": 0.1,
    "optim.clip_norm": 1.0,
    "optim.final_lr_fraction": 0.2,
    "optim.warmup_steps": 0,
    "optim.lr_schedule": "cycle",  # cosine over regime.num_steps scheduler steps, restarting
    "train.num_steps": 1000,
    "train.seeds_per_device": 4,
    "train.ema_decay": 0.95,
    "train.seeds_per_step": 32,  # 32 harmful + 32 benign seeds per step, whatever the layout
    "train.validate_every": 25,
    "train.checkpoint_every": 50,
    "train.sync_every_n_steps": 1,
    "train.loss_normalization": "reference",
    "train.norm_seeds_per_microbatch": 1,
    "train.step_on_empty_batch": True,
    "loss.beta": 0.1,
    "loss.length_normalization": False,
    "loss.nll_coef": 0.0,
    "loss.entropy_coef": 0.0,
    "sampling.temperature": 0.6,
    "sampling.top_p": 0.9,
    "sampling.max_new_tokens": 2048,
    "judge.temperature": 0.6,
    "judge.top_p": 0.9,
    "judge.num_samples": 1,
    "judge.max_new_tokens": 8192,
    "judge.condition_on": "prompt",
    "judge.faith_tie": "not_faithful",
    "game.templates": "advgame_paper",
    "game.attacker_format": "think_prompt_strict",
    "game.defender_format": "any",
    "game.optimistic_attacker": True,
    "game.selection": "reference",
    "validation.num_seeds": 0,
    "validation.batch_size": 64,
}
PER_RUN = {  # (family, loss, ablation) -> extra reference values
    ("qwen", "dpo_md", "none"): {
        "loss.kind": "dpo",
        "judge.mode": "pairwise",
        "game.num_attacks": 2,
        "game.num_responses": 2,
        "train.sample_from": "ema",
        "train.reference": "ema",
        "judge.model": "Qwen2.5-32B-Instruct",
    },
    ("llama", "ipo_md", "none"): {
        "loss.kind": "ipo",
        "train.reference": "ema",
        "judge.model": "Llama-3.3-70B-Instruct-abliterated",
    },
    ("qwen", "grpo", "none"): {
        "loss.kind": "grpo",
        "judge.mode": "pointwise",
        "game.num_attacks": 4,
        "game.num_responses": 4,
        "train.sample_from": "trained",
        "train.reference": "initial",
        "loss.tis_cap": 2.0,
        "loss.tis_detach": False,
        "loss.grpo_baseline": "across_seeds",
    },
    ("qwen", "dpo_md", "dpo_onpolicy"): {
        "loss.kind": "dpo",
        "train.sample_from": "trained",
        "train.reference": "initial",
    },
    ("qwen", "dpo_md", "small_judge"): {
        "loss.kind": "dpo",
        "judge.model": "Qwen2.5-7B-Instruct",
        "train.sample_from": "ema",
    },
    ("qwen", "dpo_md", "grpo_pairwise_onpolicy"): {
        "loss.kind": "grpo",
        "judge.mode": "pairwise",
        "game.num_attacks": 4,
        "game.num_responses": 4,
        "train.sample_from": "trained",
        "train.reference": "initial",
        "loss.tis_cap": 2.0,
    },
    ("qwen", "dpo_md", "grpo_pointwise_offpolicy"): {
        "loss.kind": "grpo",
        "judge.mode": "pointwise",
        "game.num_attacks": 4,
        "game.num_responses": 4,
        "train.sample_from": "ema",
        "train.reference": "initial",
        "loss.tis_cap": 0.0,
    },
}


@pytest.mark.parametrize("run", list(PER_RUN), ids=lambda r: "_".join(r))
def test_paper_configs_equal_reference_values(run):
    from advgame_jax.experiment.configs.paper import paper_config

    c = paper_config(*run)
    for dotted, want in {**REFERENCE_VALUES, **PER_RUN[run]}.items():
        node = c
        for part in dotted.split("."):
            node = node[part]
        assert node == want, dotted
    # Four validation splits: the vanilla and adversarial fields all exist (paths are user input).
    for field in (
        "valid_harmful",
        "valid_benign",
        "valid_adversarial_harmful",
        "valid_adversarial_benign",
    ):
        assert field in c.data


def test_paper_table_rejects_unknown_names():
    from advgame_jax.experiment.configs.paper import paper_config

    with pytest.raises(ValueError, match="ablation must be one of"):
        paper_config("qwen", "dpo_md", "tiny_judge")
    with pytest.raises(ValueError, match="loss must be one of"):
        paper_config("qwen", "ppo")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("game.num_attacks", 0, r"config\.game\.num_attacks"),
        ("game.num_attacks", 1, r"config\.game\.num_attacks: dpo needs >= 2"),
        ("game.num_responses", -1, r"config\.game\.num_responses"),
        ("loss.kind", "ppo", r"config\.loss\.kind: expected one of"),
        ("sampling.top_p", 0.0, r"config\.sampling\.top_p"),
        ("train.sample_from", "ema2", r"config\.train\.sample_from"),
        ("judge.endpoints", (), r"config\.judge\.endpoints"),
        ("judge.endpoints", ("ftp://x",), r"http\(s\)://"),
        ("optim.lr", -1.0, r"config\.optim\.lr"),
        ("mesh.tensor", 0, r"config\.mesh\.tensor"),
        ("attacker.sampler", "tgi", r"config\.attacker\.sampler"),
        ("data.train_benign", "", r"config\.data\.train_benign"),
        ("optim.lr_schedule", "linear", r"config\.optim\.lr_schedule"),
        ("train.loss_normalization", "tokens", r"config\.train\.loss_normalization"),
        ("judge.top_p", 0.0, r"config\.judge\.top_p"),
        ("judge.num_samples", 0, r"config\.judge\.num_samples"),
        ("judge.faith_tie", "coin", r"config\.judge\.faith_tie"),
        ("game.selection", "best", r"config\.game\.selection"),
        ("game.templates_file", "/nonexistent/t.txt", r"config\.game\.templates_file"),
        ("validation.batch_size", -1, r"config\.validation\.batch_size"),
        ("train.attention", "flash", r"config\.train\.attention: expected one of"),
        ("train.remat_policy", "some", r"config\.train\.remat_policy"),
        ("train.max_tokens_per_device", -1, r"config\.train\.max_tokens_per_device"),
        ("train.ema_dtype", "float16", r"config\.train\.ema_dtype"),
        ("optim.mu_dtype", "fp8", r"config\.optim\.mu_dtype"),
    ],
)
def test_bad_fields_are_named(field, value, match):
    c = complete(load(os.path.join(ROOT, "configs", "qwen_dpo_md.py")))
    node = c
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(c)


def test_seeds_per_split_global_count_and_shares():
    """Issue 17 item 24: the paper's runs play 32 + 32 seeds per step whatever the layout (was
    4 × trainer devices); each process takes an equal share; a count that does not divide
    is refused naming the field; the tiny config keeps seeds_per_device × devices."""
    from advgame_jax.experiment.configs.paper import paper_config
    from advgame_jax.experiment.validate import seeds_per_split

    c = paper_config("qwen", "dpo_md", "none")
    for devices, processes in ((8, 1), (8, 4), (64, 8), (1, 1)):
        assert seeds_per_split(c, devices, processes) == 32
        assert seeds_per_split(c, devices, processes) // processes == 32 // processes
    with pytest.raises(
        ConfigError,
        match=r"config\.train\.seeds_per_step=32: 32 seeds per split "
        r"do not split over 3 processes",
    ):
        seeds_per_split(c, 8, 3)
    tiny = load(os.path.join(ROOT, "configs", "tiny.py"))
    assert tiny.train.seeds_per_step == 0
    assert [seeds_per_split(tiny, n) for n in (1, 2, 8)] == [8, 16, 64]  # unchanged
    with pytest.raises(
        ConfigError,
        match=r"seeds_per_device=8 × 1 data-parallel devices: 8 "
        r"seeds per split do not split over 3 processes",
    ):
        seeds_per_split(tiny, 1, 3)
    tiny.train.seeds_per_step = -1
    with pytest.raises(
        ConfigError, match=r"config\.train\.seeds_per_step: expected an integer >= 0"
    ):
        validate_config(tiny)
