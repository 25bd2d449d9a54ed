"""redteam.md / redteam.json: rows holding the same attempts report the same CIs (the
bootstrap stream is keyed by the data, not by the row's label), and a set without categories
prints one `all` row instead of a duplicate `(none)` row."""

from advgame_jax.evaluation import redteam


def _records(subcategory=""):
    out = []
    for s in range(6):  # seed s succeeds on attempt 0 for s < 2, on no attempt otherwise
        for a in range(2):
            ok = s < 2 and a == 0
            out.append(
                {
                    "uid": f"u{s}",
                    "attempt": a,
                    "subcategory": subcategory,
                    "error": None,
                    "harmful": ok,
                    "success": ok,
                }
            )
    return out


def test_same_data_same_cis_and_no_duplicate_row():
    m = redteam.redteam_metrics(_records(), seed=3)
    alone = m["per_category"]["(none)"]
    for key in ("attempt_asr", "valid_attempt_asr", "best_of_n_asr"):
        assert alone[key] == m["overall"][key], key  # was: same value, different CI
    assert m["overall"]["attempt_asr"]["value"] == 2 / 12
    assert m["overall"]["best_of_n_asr"]["value"] == 2 / 6
    md = redteam._markdown(
        m, {"attacker": "a", "target": "t", "classifier": "rule", "num_attempts": 2}
    )
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| all"]

    # Two categories: each row keeps its own data; the label never changes a CI.
    recs = _records("cat0") + [
        dict(r, uid="v" + r["uid"], subcategory="cat1", success=False, harmful=False)
        for r in _records()
    ]
    m2 = redteam.redteam_metrics(recs, seed=3)
    assert m2["per_category"]["cat0"]["attempt_asr"] == m["overall"]["attempt_asr"]
    assert m2["per_category"]["cat1"]["attempt_asr"]["value"] == 0.0
    md2 = redteam._markdown(
        m2, {"attacker": "a", "target": "t", "classifier": "rule", "num_attempts": 2}
    )
    assert sum(ln.startswith(("| all", "| cat0", "| cat1")) for ln in md2.splitlines()) == 3
