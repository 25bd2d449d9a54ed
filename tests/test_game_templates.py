"""Template registry and GameConfig validation."""

import pytest

from advgame_jax.experiment.validate import game_config_from_experiment
from advgame_jax.game import GameConfig, GameConfigError
from advgame_jax.game.templates import (
    REQUIRED_SECTIONS,
    TemplateError,
    TemplateSet,
    attacker_rubric,
    available_template_sets,
    defender_rubric,
    get_template_set,
    parse_template_text,
    register_template_set,
)


def test_shipped_set_is_complete_and_fills_placeholders():
    t = get_template_set("advgame_v1")
    assert "advgame_v1" in available_template_sets()
    seed = "a seed with {response} and {attack} in it"
    for cat in ("harmful", "benign"):
        text = t.attacker_prompt(seed, cat, "think_prompt_strict")
        assert f"<query>\n{seed}\n</query>" in text  # values are never re-substituted
        assert text.endswith(t.sections["attacker_format_think_prompt_strict"])
        assert "{seed}" not in text
    assert t.defender_prompt("just x") == "just x"
    pair = t.pairwise_prompt("deflection", "Q", "RA", "RB")
    assert "<score_A>n</score_A>" in pair and "<score_B>n</score_B>" in pair
    assert "RA" in pair and "RB" in pair and pair.index("RA") < pair.index("RB")
    assert "<score>n</score>" in t.pointwise_prompt("refusal", "Q", "R")
    assert "<answer>True</answer>" in t.faithfulness_prompt("S", "X", "benign")
    # Harmful and benign instructions differ (the attacker's goal differs).
    assert t.sections["attacker_task_harmful"] != t.sections["attacker_task_benign"]
    assert t.sections["faithfulness_harmful"] != t.sections["faithfulness_benign"]


def test_rubric_choice():
    assert (defender_rubric("harmful"), defender_rubric("benign")) == ("deflection", "compliance")
    assert (attacker_rubric("harmful"), attacker_rubric("benign")) == ("compliance", "refusal")
    with pytest.raises(ValueError, match="category"):
        defender_rubric("neutral")


def test_unknown_set_lists_known_names():
    with pytest.raises(TemplateError, match=r"unknown template set 'nope'.*advgame_v1"):
        get_template_set("nope")


def test_register_and_validate_custom_set():
    base = dict(get_template_set("advgame_v1").sections)
    custom = TemplateSet("custom_test_v1", {**base, "defender": "Answer: {prompt}"})
    register_template_set(custom)
    assert get_template_set("custom_test_v1").defender_prompt("x") == "Answer: x"
    with pytest.raises(TemplateError, match="already exists"):
        register_template_set(custom)
    with pytest.raises(TemplateError, match="missing sections"):
        TemplateSet("broken", {k: v for k, v in base.items() if k != "defender"})
    with pytest.raises(TemplateError, match="placeholders"):
        TemplateSet("broken", {**base, "pointwise_refusal": "no placeholders"})


def test_parse_template_text_errors():
    with pytest.raises(TemplateError, match="no '=== key ===' sections"):
        parse_template_text("t", "just text")
    text = "\n".join(
        f"=== {k} ===\n" + " ".join("{%s}" % p for p in v) for k, v in REQUIRED_SECTIONS.items()
    )
    assert parse_template_text("t", text).sections["defender"] == "{prompt}"
    with pytest.raises(TemplateError, match="appears twice"):
        parse_template_text("t", text + "\n=== defender ===\n{prompt}")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_attacks", 0, r"GameConfig.num_attacks: expected an integer >= 1, got 0"),
        ("num_responses", 1.5, r"GameConfig.num_responses"),
        ("num_faith_samples", True, r"GameConfig.num_faith_samples"),
        ("attacker_format", "json", r"GameConfig.attacker_format: expected one of"),
        ("condition_on", "both", r"GameConfig.condition_on"),
        ("judge_mode", "listwise", r"GameConfig.judge_mode"),
        ("optimistic_attacker", 1, r"GameConfig.optimistic_attacker: expected True or False"),
        (
            "templates",
            "advgame_v0",
            r"GameConfig.templates: unknown template set 'advgame_v0'.*advgame_v1",
        ),
        (
            "attacker_sampling",
            {"temperature": 1.0},
            r"GameConfig.attacker_sampling: expected a SamplingParams",
        ),
    ],
)
def test_game_config_validation(field, value, match):
    with pytest.raises(GameConfigError, match=match):
        GameConfig(**{field: value})


def test_game_config_roundtrip_and_experiment_mapping():
    from advgame_jax.experiment.configs.base import base_config

    c = base_config()
    c.judge.mode = "pointwise"
    c.judge.swap_positions = True
    c.judge.attacker_judge = False
    c.game.optimistic_attacker = False
    c.sampling.max_new_tokens = 77
    g = game_config_from_experiment(c)
    assert (g.judge_mode, g.swap_positions, g.attacker_judge_enabled, g.optimistic_attacker) == (
        "pointwise",
        True,
        False,
        False,
    )
    assert g.attacker_sampling.max_new_tokens == 77 and g.defender_sampling.temperature == 0.6
    assert GameConfig.from_dict(g.to_dict()) == g
