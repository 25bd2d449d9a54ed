"""Attack-format, judge-score and faithfulness parsing (GAME_SPEC §2.3, §2.4, §2.6, with the
reference implementation's rules of §2b: case-insensitive tags, no ``think>``/``prompt>``
inside a body, the last WELL-FORMED score, both pairwise scores needed, no negative numbers,
the FIRST ``<answer>`` holding exactly True/False)."""

import pytest

from advgame_jax.game.parsing import (
    faith_majority,
    parse_attack,
    parse_faith_verdict,
    parse_pair_scores,
    parse_score,
)

TP = "think_prompt_strict"
P = "prompt_strict"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>plan</think><prompt>do it</prompt>", "do it"),
        ("  \n<think>plan</think>\n\n<prompt>\n  do it  \n</prompt>\n  ", "do it"),
        ("<think></think><prompt>multi\nline</prompt>", "multi\nline"),
        (
            "<think>a</think><prompt>   </prompt>",
            "",
        ),  # an empty body parses (faithfulness rejects it)
        ("<THINK>a</THINK><PROMPT>do it</PROMPT>", "do it"),  # tags match case-insensitively
        ("<Think>a</think>\n<prompt>do it</Prompt>", "do it"),
    ],
)
def test_think_prompt_strict_accepts(text, expected):
    assert parse_attack(text, TP) == expected


@pytest.mark.parametrize(
    "text",
    [
        "<prompt>do it</prompt>",  # think missing
        "<think>a</think><prompt>do it</prompt> trailing",  # trailing text
        "<think>a</think><prompt>do it</prompt></prompt>",  # extra closing tag
        "preface <think>a</think><prompt>do it</prompt>",  # text before <think>
        "<think>a</think> between <prompt>do it</prompt>",  # text between blocks
        "<think>a<think>b</think></think><prompt>do it</prompt>",  # nested think
        "<think>a</think><prompt>x <prompt>y</prompt></prompt>",  # nested prompt
        "<think>a</think><prompt>x</prompt><prompt>y</prompt>",  # repeated prompt
        "<think>a</think><think>b</think><prompt>do it</prompt>",  # repeated think
        "<prompt>do it</prompt><think>a</think>",  # wrong order
        "<think>a</think><prompt>do it",  # unclosed
        "<think>a prompt> b</think><prompt>do it</prompt>",  # 'prompt>' inside the think body
        "<think>a</think><prompt>see think> here</prompt>",  # 'think>' inside the prompt body
        "<think>a <prompt b</think><prompt>do it</prompt>",  # '<prompt' opening in a body
    ],
)
def test_think_prompt_strict_rejects(text):
    assert parse_attack(text, TP) is None


def test_prompt_strict():
    assert parse_attack(" \n<prompt> do it </prompt>\n", P) == "do it"
    assert parse_attack("<prompt>do it</prompt> extra", P) is None
    assert parse_attack("<think>a</think><prompt>do it</prompt>", P) is None
    assert parse_attack("<prompt>a</prompt><prompt>b</prompt>", P) is None
    # Reference rule: only prompt tags are banned inside a prompt_strict body.
    assert parse_attack("<prompt>a <think>b</think></prompt>", P) == "a <think>b</think>"
    assert parse_attack("<PROMPT>a</Prompt>", P) == "a"
    assert parse_attack("<prompt>a <prompt attr</prompt>", P) is None
    assert parse_attack("lead <prompt>a</prompt>", P) is None


def test_any_format():
    assert (
        parse_attack("  whole output <prompt>kept</prompt> ", "any")
        == "whole output <prompt>kept</prompt>"
    )
    assert parse_attack(" \n ", "any") == ""  # 'any' never fails
    with pytest.raises(ValueError, match="unknown format"):
        parse_attack("x", "json")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<score>7</score>", 7.0),
        ("<score> 7.5 </score>", 7.5),
        ("<score>8/10</score>", 8.0),
        ("<score>8 / 10</score>", 8.0),
        ("<score>11</score>", 10.0),
        ("<score>-3</score>", None),  # no negative numbers
        ("<score>0</score>", 0.0),
        ("first <score>2</score> then <score>9</score>", 9.0),  # the last match counts
        ("<score>2</score> final <score>abc</score>", 2.0),  # the last WELL-FORMED match counts
        ("<score>2</score> <score>-1</score>", 2.0),
        ("<score>7.25</score>", None),
        ("<score>abc</score>", None),
        ("<score>-</score>", None),
        ("<score></score>", None),
        ("<score>8/5</score>", None),
        ("<score>7 points</score>", None),
        ("no score at all", None),
        (None, None),
    ],
)
def test_parse_score(text, expected):
    assert parse_score(text, "score") == expected


def test_parse_pair_scores():
    assert parse_pair_scores("<score_A>3</score_A> <score_B>9.5/10</score_B>") == (3.0, 9.5)
    text = "<score_A>1</score_A><score_B>2</score_B> revised: <score_A>4</score_A><score_B>12</score_B>"
    assert parse_pair_scores(text) == (4.0, 10.0)
    # Both scores are needed, else the whole judgment fails.
    assert parse_pair_scores("<score_A>5</score_A> <score_B>x</score_B>") == (None, None)
    assert parse_pair_scores("<score_A>5</score_A>") == (None, None)
    # A pointwise tag is not a pairwise answer, and vice versa.
    assert parse_pair_scores("<score>5</score>") == (None, None)
    assert parse_score("<score_A>5</score_A>", "score") is None


def test_parse_faith_verdict():
    assert parse_faith_verdict("because ... <answer>True</answer>") is True
    assert parse_faith_verdict("<answer> False </answer>") is False
    # The FIRST WELL-FORMED answer element counts (exactly True or False), as in the reference.
    assert parse_faith_verdict("<answer>True</answer> on reflection <answer>False</answer>") is True
    assert parse_faith_verdict("<answer>false</answer>") is None
    # Issue 17 item 25: a malformed element before the verdict is skipped (was None).
    assert parse_faith_verdict("<answer>maybe</answer> <answer>True</answer>") is True
    assert parse_faith_verdict("<answer> your answer </answer>\n<answer>False</answer>") is False
    assert parse_faith_verdict("<answer>TRUE</answer> <answer>yes</answer>") is None
    assert parse_faith_verdict("<answer>maybe</answer>") is None
    assert parse_faith_verdict("True") is None
    assert parse_faith_verdict(None) is None


@pytest.mark.parametrize(
    "votes, expected",
    [
        ([True], True),
        ([False], False),
        ([None], None),
        ([], None),
        ([True, True, False], True),
        ([False, None, False, True], False),
        ([True, None], True),  # unparsable samples abstain
        ([True, False], None),  # tie -> unparsable (BAD_FAITH_JUDGE)
        ([True, False, None, None], None),
    ],
)
def test_faith_majority(votes, expected):
    assert faith_majority(votes) is expected


def test_faith_majority_reference_tie_is_not_faithful():
    # Reference rule: a tie is not a strict majority for "faithful" -> False (NOT_FAITHFUL).
    assert faith_majority([True, False], "not_faithful") is False
    assert faith_majority([True, False, None], "not_faithful") is False
    assert faith_majority([None, None], "not_faithful") is None  # nothing parsed
    assert faith_majority([True, True, False], "not_faithful") is True
