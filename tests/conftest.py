"""Test set-up: 8 virtual CPU devices for mesh tests, fp32 matmuls, shared tiny fixtures."""

import os

# Must happen before JAX initialises its backends anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def wildjailbreak_dir():
    """The 512 real seed prompts in ../shared/data (read in place, never copied)."""
    path = SHARED_DATA / "wildjailbreak_vanilla"
    if not path.is_dir():
        pytest.fail(f"shared seed data not found at {path}")
    return path


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """The toy world of ``configs/tiny.py`` (seed 0), built once per test session."""
    import importlib

    from advgame_jax import game
    from advgame_jax.data import packaged_seed_path, read_seeds_jsonl
    from advgame_jax.experiment.toy_world import build_toy_world

    c = importlib.import_module("configs.tiny").get_config()
    path = str(tmp_path_factory.mktemp("toy"))
    templates = game.get_template_set(c.game.templates)
    build_toy_world(path, seed=0, train_seeds=read_seeds_jsonl(packaged_seed_path("toy_seeds.jsonl")),
                    attacker_prompt_text=lambda s: templates.attacker_prompt(
                        s.prompt, s.category, c.game.attacker_format),
                    warmup_steps=c.toy_warmup_steps)
    return path
