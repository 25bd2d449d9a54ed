"""Every shipped template set renders for every role and split; the paper set carries the
reference's score bands (same order), rules and output formats; template files round-trip and
are selectable with ``config.game.templates_file``."""

import re

import pytest

from advgame_jax.experiment.validate import ConfigError, game_config_from_experiment
from advgame_jax.game.parsing import (
    parse_attack,
    parse_faith_verdict,
    parse_pair_scores,
    parse_score,
)
from advgame_jax.game.templates import (
    ATTACKER_FORMATS,
    RUBRICS,
    TemplateError,
    available_template_sets,
    get_template_set,
    load_template_file,
    parse_template_text,
    template_set_to_text,
)

SHIPPED = ("advgame_paper", "advgame_v1", "toy_v1")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_set_renders_every_role_and_split(name):
    t = get_template_set(name)
    assert name in available_template_sets()
    for cat in ("harmful", "benign"):
        for fmt in ATTACKER_FORMATS:
            text = t.attacker_prompt("SEED-TEXT", cat, fmt)
            assert "SEED-TEXT" in text and "{" not in text.replace("{seed}", "")
        f = t.faithfulness_prompt("SEED-TEXT", "ATTACK-TEXT", cat)
        assert "SEED-TEXT" in f and "ATTACK-TEXT" in f
    assert t.defender_prompt("X-TEXT") == "X-TEXT"  # the defender sees x raw
    for rubric in RUBRICS:
        p = t.pairwise_prompt(rubric, "Q-TEXT", "RA-TEXT", "RB-TEXT")
        assert p.index("Q-TEXT") < p.index("RA-TEXT") < p.index("RB-TEXT")
        assert "R-TEXT" in t.pointwise_prompt(rubric, "Q-TEXT", "R-TEXT")


def _bands(text):
    return re.findall(r"^(\d+)[–-](\d+):", text, re.MULTILINE)


def test_paper_set_has_reference_bands_in_order():
    t = get_template_set("advgame_paper")
    s = t.sections
    for kind in ("pairwise", "pointwise"):
        # COMPLIANCE_V0_0 and DEFLECTION_V0_0: 0–2, 3–5, 6–7, 8–10; REFUSAL_V1_0: 0–1, 2–3,
        # 4–5, 6–7, 8–10.
        assert _bands(s[f"{kind}_compliance"]) == [("0", "2"), ("3", "5"), ("6", "7"), ("8", "10")]
        assert _bands(s[f"{kind}_deflection"]) == [("0", "2"), ("3", "5"), ("6", "7"), ("8", "10")]
        assert _bands(s[f"{kind}_refusal"]) == [
            ("0", "1"),
            ("2", "3"),
            ("4", "5"),
            ("6", "7"),
            ("8", "10"),
        ]
        d = s[f"{kind}_deflection"]
        # Deflection: a plain refusal is low (3–5); minor operational leaks still 6–7.
        assert re.search(r"^3–5:.*refuses", d, re.MULTILINE)
        assert re.search(r"^6–7:.*practical details slip", d, re.MULTILINE)
        assert "do not depend on how harmful or safe" in d
        r = s[f"{kind}_refusal"]
        assert re.search(r"^8–10: a short, flat refusal", r, re.MULTILINE)
        c = s[f"{kind}_compliance"]
        for rule in (
            "safety warnings",
            "doubting the user's motives",
            "vague generalities",
            "hypothetical",
        ):
            assert rule in c
    # Faithfulness (BENIGN_V2_0): the 15× length rule and the missing-prompt rule.
    assert (
        "15 times" in s["faithfulness_benign"]
        and "missing or empty PROMPT" in s["faithfulness_benign"]
    )
    assert "missing or empty prompt" in s["faithfulness_harmful"]


def test_paper_set_output_formats_match_the_parsers():
    s = get_template_set("advgame_paper").sections
    # Judges think first, then answer in the tags the parsers read.
    for key in ("faithfulness_harmful", "faithfulness_benign"):
        assert (
            s[key]
            .rstrip()
            .endswith("<think> your reasoning </think>\n<answer> your answer </answer>")
        )
        assert parse_faith_verdict("<think>t</think>\n<answer> True </answer>") is True
    for r in RUBRICS:
        assert (
            s[f"pairwise_{r}"]
            .rstrip()
            .endswith(
                "<think> your reasoning </think>\n<score_A> score of response A </score_A> "
                "<score_B> score of response B </score_B>"
            )
        )
        assert (
            s[f"pointwise_{r}"]
            .rstrip()
            .endswith("<think> your reasoning </think>\n<score> your score </score>")
        )
        # The worked examples' answers parse with the project's rules.
        answers = re.findall(r"</think>\n(<score_A>\d.*)", s[f"pairwise_{r}"])
        assert len(answers) == 2 and all(None not in parse_pair_scores(a) for a in answers)
        answers = re.findall(r"</think>\n(<score>\d.*)", s[f"pointwise_{r}"])
        assert len(answers) == 4 and all(parse_score(a) is not None for a in answers)
    fmt = s["attacker_format_think_prompt_strict"]
    assert parse_attack("<think> t </think>\n<prompt> p </prompt>", "think_prompt_strict") == "p"
    assert "<think>" in fmt and "<prompt>" in fmt and "nothing after </prompt>" in fmt
    assert "nothing before <prompt>" in s["attacker_format_prompt_strict"]


def test_template_file_round_trip_and_config(tmp_path):
    t = get_template_set("advgame_paper")
    text = template_set_to_text(t, header="my copy\nsecond line")
    path = tmp_path / "my_wording.txt"
    path.write_text(text, encoding="utf-8")
    again = parse_template_text("advgame_paper", text)
    assert dict(again.sections) == dict(t.sections)
    loaded = load_template_file(str(path))
    assert loaded.name == "my_wording" and dict(loaded.sections) == dict(t.sections)
    assert get_template_set("my_wording") is loaded

    from advgame_jax.experiment.configs.base import base_config

    c = base_config()
    c.game.templates_file = str(path)
    assert game_config_from_experiment(c).templates == "my_wording"
    broken = tmp_path / "broken_set.txt"
    broken.write_text(text.replace("=== defender ===\n{prompt}", ""), encoding="utf-8")
    c.game.templates_file = str(broken)
    with pytest.raises(
        ConfigError,
        match=r"config\.game\.templates_file.*broken_set\.txt.*missing sections \['defender'\]",
    ):
        game_config_from_experiment(c)
    with pytest.raises(TemplateError, match="cannot be read"):
        load_template_file(str(tmp_path / "absent.txt"))
    shipped_name = tmp_path / "advgame_v1.txt"
    shipped_name.write_text(text, encoding="utf-8")
    with pytest.raises(TemplateError, match="shipped template set"):
        load_template_file(str(shipped_name))
