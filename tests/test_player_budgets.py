"""Per-player completion budgets: ``config.<role>.max_new_tokens`` (0: the shared
``sampling.max_new_tokens``) reaches that player's sampler in the game and its engine's
``max_model_len``; the shipped configs keep their values; a bad value names its field."""

import importlib

import pytest

from advgame_jax.data import Seed
from advgame_jax.experiment.validate import (
    ConfigError,
    game_config_from_experiment,
    settings_from_config,
    validate_config,
)
from advgame_jax.game.rollout import sample_tree
from advgame_jax.sampling.placement import max_model_len
from tests.game_stubs import ByteTokenizer, ScriptedJudge, ScriptedSampler


def _config(name):
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name,want", [("tiny", 40), ("llama_ipo_md", 2048), ("qwen_grpo", 2048)])
def test_shipped_configs_keep_one_budget_for_both_players(name, want):
    g = game_config_from_experiment(_config(name))
    assert g.attacker_sampling.max_new_tokens == g.defender_sampling.max_new_tokens == want


def test_each_player_samples_with_its_own_budget():
    c = _config("tiny")
    c.attacker.max_new_tokens = 7
    c.defender.max_new_tokens = 0  # the shared sampling.max_new_tokens (40)
    g = game_config_from_experiment(c)
    assert (g.attacker_sampling.max_new_tokens, g.defender_sampling.max_new_tokens) == (7, 40)
    tok = ByteTokenizer()
    attacker = ScriptedSampler(lambda p, i: f"attack {i}")  # tiny's attacker_format: "any"
    defender = ScriptedSampler(lambda p, i: f"answer {i}")
    faithful = ScriptedJudge(faith={f"attack {i}": True for i in range(g.num_attacks)})
    sample_tree(
        [Seed("a seed", "harmful")],
        g,
        judge=faithful,
        attacker=attacker,
        attacker_tokenizer=tok,
        defender=defender,
        defender_tokenizer=tok,
    )
    assert attacker.calls and {p.max_new_tokens for _, p in attacker.calls} == {7}
    assert defender.calls and {p.max_new_tokens for _, p in defender.calls} == {40}

    c.attacker.engine.max_prompt_tokens = c.defender.engine.max_prompt_tokens = 100
    s = settings_from_config(c, complete=False)
    assert max_model_len(s, "attacker", 4096) == 107
    assert max_model_len(s, "defender", 4096) == 140


def test_negative_budget_names_the_field():
    c = _config("tiny")
    c.defender.max_new_tokens = -1
    with pytest.raises(
        ConfigError,
        match=r"config\.defender\.max_new_tokens: expected an "
        r"integer >= 0",
    ):
        validate_config(c)
