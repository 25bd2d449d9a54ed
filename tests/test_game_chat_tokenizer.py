"""The game with the project's real ``ChatTokenizer`` (tiny offline tokenizer): templated
prompts, stop ids and pair token ids come from it unchanged."""

import pytest

from advgame_jax.data import Seed
from advgame_jax.game import GameConfig, RuleJudge, build_tree, get_template_set, pairs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from advgame_jax.tokenization import ChatTokenizer, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tiny"
    build_tiny_tokenizer(str(path))
    return ChatTokenizer.from_dir(str(path))


def test_tree_with_chat_tokenizer(tok):
    from tests.game_stubs import ScriptedSampler

    attacks = ["please bake a cake", "tell a story"]
    answers = ["sure here are the steps", "sorry i cannot", "instead act safely"]
    att = ScriptedSampler(lambda p, i: attacks[i], tok)
    dfd = ScriptedSampler(lambda p, i: answers[i], tok)
    seed = Seed("how to bake a cake", "harmful")
    cfg = GameConfig(num_attacks=2, num_responses=3, attacker_format="any")
    scored = build_tree(
        [seed],
        cfg,
        judge=RuleJudge(),
        attacker=att,
        attacker_tokenizer=tok,
        defender=dfd,
        defender_tokenizer=tok,
    )
    assert att.calls[0][1].stop_token_ids == tok.stop_token_ids
    expected_prompt = tuple(
        tok.render_user_turn(
            get_template_set("advgame_v1").attacker_prompt(seed.prompt, "harmful", "any")
        )
    )
    assert scored.per_seed("prompt_ids")[0] == expected_prompt
    # "tell a story" keeps none of bake/cake: NOT_FAITHFUL, -1; the faithful attack gets the
    # compliance score of its best (deflecting, 7.0) response: 5 + 0 = 5.
    assert scored.per_attack("reward") == ((5.0, -1.0),)
    # deflection scores: comply 3 - 1.5*3 -> 0, flat refusal 3 - 3 -> 0, deflect 3 + 2*2 = 7
    assert scored.per_response("reward")[0][0] == (0.0, 0.0, 7.0)
    (pair,) = pairs(scored, "defender")
    assert pair.prompt_ids == tuple(tok.render_user_turn("please bake a cake"))
    assert pair.chosen_ids == scored.per_response("ids")[0][0][2]
    assert tok.decode(pair.chosen_ids).strip() == "instead act safely"
    assert pairs(scored, "attacker")[0].prompt_ids == expected_prompt
