"""Sampler placement config: an over-subscribed colocated memory plan is refused before any
model loads (with the numbers), bad engine fields name themselves, lengths are derived from
the prompt and completion budgets."""

import importlib

import pytest

from advgame_jax.experiment.validate import ConfigError, settings_from_config, validate_config
from advgame_jax.sampling.placement import max_model_len, placement_of

tiny = importlib.import_module("configs.tiny")


def _config(tmp_path, **placements):
    c = tiny.get_config()
    c.workdir = str(tmp_path)
    for role, p in placements.items():
        c[role].placement = p
    return c


def test_over_subscribed_colocated_plan_is_refused_with_the_numbers(tmp_path, monkeypatch):
    c = _config(tmp_path, attacker="colocated", defender="colocated")
    c.placement.jax_memory_fraction = 0.6
    c.attacker.engine.gpu_memory_utilization = 0.25
    c.defender.engine.gpu_memory_utilization = 0.25
    import advgame_jax.experiment.players as players

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the plan was checked")

    monkeypatch.setattr(players, "load_hf", no_load)
    from advgame_jax.experiment.loop import GameRunner

    with pytest.raises(ConfigError) as e:
        GameRunner(c)
    msg = str(e.value)
    assert "config.placement" in msg
    assert "JAX 0.60 + attacker engine 0.25 + defender engine 0.25 + margin 0.05 = 1.15" in msg
    # The same plan with room to spare is accepted.
    c.placement.jax_memory_fraction = 0.4
    validate_config(c)


def test_colocated_needs_explicit_shares(tmp_path):
    c = _config(tmp_path, defender="colocated")
    with pytest.raises(ConfigError, match="defender.engine.gpu_memory_utilization"):
        validate_config(c)
    c.defender.engine.gpu_memory_utilization = 0.3
    with pytest.raises(ConfigError, match="placement.jax_memory_fraction"):
        validate_config(c)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("placement", "gpu", "attacker.placement"),
        ("engine.tensor_parallel_size", 0, "attacker.engine.tensor_parallel_size"),
        ("engine.request_timeout_s", -1.0, "attacker.engine.request_timeout_s"),
        ("engine.address", "nohost", "attacker.engine.address"),
    ],
)
def test_bad_engine_fields_name_themselves(tmp_path, field, value, match):
    c = _config(tmp_path, attacker="offloaded")
    node = c.attacker
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(c)


def test_placement_defaults_and_lengths(tmp_path):
    c = _config(tmp_path)
    assert placement_of(validate_config(c), "attacker") == "jax"
    c.defender.sampler = "vllm"
    s = validate_config(c)  # legacy sampler='vllm' without a plan stays accepted
    assert placement_of(s, "defender") == "colocated"
    assert max_model_len(s, "defender", 1024) == 1024  # no prompt budget: the model's context
    c.defender.engine.max_prompt_tokens = 200
    s = settings_from_config(c)
    assert max_model_len(s, "defender", 1024) == 200 + c.sampling.max_new_tokens
    c.defender.vllm_max_model_len = 512
    assert max_model_len(settings_from_config(c), "defender", 1024) == 512


def test_memory_plan_sets_jax_fraction_before_jax_initialises(tmp_path):
    import subprocess
    import sys

    code = (
        "import importlib, os\n"
        "from advgame_jax.experiment.validate import settings_from_config\n"
        "from advgame_jax.sampling.placement import apply_memory_plan\n"
        "c = importlib.import_module('configs.tiny').get_config()\n"
        "c.defender.placement = 'colocated'\n"
        "c.defender.engine.gpu_memory_utilization = 0.3\n"
        "c.placement.jax_memory_fraction = 0.4\n"
        "apply_memory_plan(settings_from_config(c, complete=False))\n"
        "import jax; jax.devices()\n"
        "print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])\n"
    )
    env = {
        k: v for k, v in __import__("os").environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0.400"
