"""The dataclass↔JSON codec and the slot tree's own checks: a golden tree survives json, and
malformed plain values fail naming the path of the bad value."""

import json

import pytest

from advgame_jax.codec import CodecError, from_plain, to_plain
from advgame_jax.errors import UserError
from advgame_jax.game import GameConfig, ScoredTree
from advgame_jax.game.tree import AttackSlot, ResponseSlot, RolloutTree, SeedSlot, XError, YError
from tests.test_game_golden import CFG, play


def test_golden_tree_round_trips_through_json():
    scored, *_ = play(CFG)
    plain = json.loads(json.dumps(to_plain(scored), allow_nan=False))
    back = from_plain(ScoredTree, plain)
    assert back == scored
    # Enums come back as enums, tuples as tuples, floats as floats.
    assert back.seeds[0].attacks[1].error is XError.MAX_LENGTH
    assert back.seeds[0].attacks[0].responses[0].ids == scored.seeds[0].attacks[0].responses[0].ids
    assert isinstance(back.seeds[0].attacks[0].ids, tuple)
    assert back.config == CFG


def test_game_config_dict_is_the_codec_form():
    g = GameConfig(num_attacks=3, selection="reference")
    d = g.to_dict()
    assert d["attacker_sampling"]["stop_token_ids"] == [] and GameConfig.from_dict(d) == g


def test_malformed_values_name_their_path():
    scored, *_ = play(CFG)
    plain = json.loads(json.dumps(to_plain(scored)))
    bad = json.loads(json.dumps(plain))
    bad["seeds"][2]["attacks"][1]["responses"][0]["error"] = "NOPE"
    with pytest.raises(
        CodecError, match=r"seeds\[2\]\.attacks\[1\]\.responses\[0\]\.error: expected one of"
    ):
        from_plain(ScoredTree, bad)
    bad = json.loads(json.dumps(plain))
    bad["seeds"][0]["attacks"][0]["reward"] = "3"
    with pytest.raises(
        CodecError, match=r"seeds\[0\]\.attacks\[0\]\.reward: expected a number, got str"
    ):
        from_plain(ScoredTree, bad)
    bad = json.loads(json.dumps(plain))
    del bad["seeds"][0]["s"]
    bad["seeds"][0]["extra"] = 1
    with pytest.raises(CodecError, match=r"missing \['s'\], unknown \['extra'\]") as err:
        from_plain(ScoredTree, bad)
    assert isinstance(err.value, UserError)
    with pytest.raises(CodecError, match="expected a number, got bool"):
        from_plain(ResponseSlot, {**to_plain(ResponseSlot()), "raw_reward": True})


def test_tree_rejects_ragged_shapes_and_unknown_fields():
    att = AttackSlot("", (), (), None, "x", None, responses=(ResponseSlot(),) * 2)
    short = AttackSlot("", (), (), None, "x", None, responses=(ResponseSlot(),))
    with pytest.raises(ValueError, match="same number"):
        RolloutTree((SeedSlot("s", "harmful", (), (att, short)),), False)
    tree = RolloutTree((SeedSlot("s", "harmful", (), (att, att)),), False)
    assert tree.shape == (1, 2, 2)
    assert tree.per_response("error") == (((YError.PROMPT_NOT_VALID,) * 2,) * 2,)
    with pytest.raises(AttributeError, match="no field 'reward'"):
        tree.per_seed("reward")
