"""no_signal_warning: one line naming the dominant error, the role and the config field."""

from advgame_jax.game.diagnosis import no_signal_warning
from advgame_jax.game.tree import XError, YError


def _record(x=None, y=None, pairs=(1, 1), x_slots=4, y_slots=8, splits=("harmful", "benign")):
    """A step record as tree_metrics + the loop write it: the same rates on every split."""
    rec = {}
    for s in splits:
        rec[f"{s}/x/slots"], rec[f"{s}/y/slots"] = float(x_slots), float(y_slots)
        for e in XError:
            rec[f"{s}/x/rate/{e.value}"] = (x or {}).get(e, 0.0)
        for e in YError:
            rec[f"{s}/y/rate/{e.value}"] = (y or {}).get(e, 0.0)
        rec[f"{s}/pairs/attacker"], rec[f"{s}/pairs/defender"] = map(float, pairs)
    return rec


def test_healthy_step_says_nothing():
    assert (
        no_signal_warning(_record(x={XError.NOT_FAITHFUL: 0.5}, y={YError.MAX_LENGTH: 0.75}))
        is None
    )
    assert no_signal_warning({"time/step": 3.0}) is None  # no game keys (e.g. a skipped step)


def test_dominant_defender_max_length_names_the_field():
    msg = no_signal_warning(_record(y={YError.MAX_LENGTH: 0.875}, pairs=(0, 0)))
    assert msg.startswith("no training pairs (attacker 0, defender 0): ")
    assert "defender responses 88% MAX_LENGTH" in msg and "sampling.max_new_tokens" in msg
    assert "\n" not in msg


def test_upstream_cause_hides_the_derived_error():
    # Every attack unfaithful → every response PROMPT_NOT_VALID: name the attacker's error.
    msg = no_signal_warning(
        _record(x={XError.NOT_FAITHFUL: 1.0}, y={YError.PROMPT_NOT_VALID: 1.0}, pairs=(0, 0))
    )
    assert "attacks 100% NOT_FAITHFUL" in msg and "game.templates" in msg
    assert "PROMPT_NOT_VALID" not in msg
    # The derived error alone is still named.
    msg = no_signal_warning(_record(x={XError.NO_VALID_RESPONSE: 0.9}, pairs=(0, 3)))
    assert msg.startswith("no attacker pairs (attacker 0, defender 6)")  # both splits
    assert "NO_VALID_RESPONSE" in msg and "defender's errors" in msg


def test_judge_errors_and_pooling_over_splits():
    rec = _record(x={XError.BAD_FAITH_JUDGE: 1.0}, pairs=(2, 2), splits=("harmful",))
    rec.update(
        {
            k.replace("harmful", "benign"): v
            for k, v in _record(pairs=(2, 2), x_slots=1, splits=("harmful",)).items()
        }
    )
    # 4 of 5 attack slots failed the judge: 80% is not above the threshold...
    assert no_signal_warning(rec) is None
    # ...81% of them is, even with pairs: "little training signal", naming the judge.
    rec["benign/x/slots"] = 0.9
    rec["harmful/x/slots"] = 4.0
    msg = no_signal_warning(rec)
    assert msg.startswith("little training signal: attacks 82% BAD_FAITH_JUDGE (look at judge")


def test_no_pairs_without_dominant_error_names_each_players_largest_error():
    msg = no_signal_warning(
        _record(
            x={XError.NOT_FAITHFUL: 0.5, XError.PARSING: 0.25},
            y={YError.MAX_LENGTH: 0.6, YError.BAD_DEF_JUDGE: 0.1},
            pairs=(0, 0),
        )
    )
    assert "attacks 50% NOT_FAITHFUL" in msg and "defender responses 60% MAX_LENGTH" in msg
    assert "PARSING" not in msg and "BAD_DEF_JUDGE" not in msg
    msg = no_signal_warning(_record(pairs=(0, 0)))
    assert "no errors; the judge gave equal scores" in msg
