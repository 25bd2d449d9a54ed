"""Eval reports what was judged: rates over the judged examples with their n, Wilson CIs
(against a hand-computed value), judge failures in their own column, a warning above the
threshold — never "100.0 [100.0, 100.0]" from 2 judged of 32."""

import math

import pytest

from advgame_jax.evaluation import metrics


def _records(n, judged, refusal=True):
    return [
        {
            "category": "benign",
            "refusal": refusal if i < judged else None,
            "harmful": None,
            "finish_reason": "stop",
            "num_tokens": 5,
            "num_chars": 20,
        }
        for i in range(n)
    ]


def test_wilson_interval_matches_the_formula():
    # 1 of 3 by hand: p = 1/3, z = 1.96: centre (p + z²/6) / (1 + z²/3), half-width
    # z·sqrt(p(1-p)/3 + z²/36) / (1 + z²/3).
    z, p, n = 1.959963984540054, 1 / 3, 3
    d = 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    assert metrics.wilson_ci(1, 3) == pytest.approx((c - h, c + h), abs=1e-12)
    assert metrics.wilson_ci(0, 0) is None
    lo, hi = metrics.wilson_ci(2, 2)
    assert hi == 1.0 and lo == pytest.approx(0.3424, abs=1e-4)


def test_two_judged_of_32_reports_n_failures_and_a_warning():
    m = metrics.set_metrics(_records(32, judged=2))
    assert m["over_refusal"] == 1.0 and m["over_refusal_n"] == 2
    assert m["judge_failures"] == 30 and m["judge_failure_rate"] == pytest.approx(30 / 32)
    lo, hi = m["over_refusal_ci"]
    assert lo < 0.35 and hi == 1.0  # not [1.0, 1.0]
    table = metrics.markdown_table({"benign": m})
    row = next(line for line in table.splitlines() if line.startswith("| benign |"))
    assert "100.0 [34.2, 100.0] (n=2)" in row
    assert "100.0 [100.0, 100.0]" not in table
    assert "| 30 (93.8%) |" in row
    warnings = metrics.judge_failure_warnings({"benign": m})
    assert len(warnings) == 1 and "30 of 32 judgments failed" in warnings[0]
    assert table.startswith("**Warning:** set benign: 30 of 32")


def test_fully_judged_set_has_no_warning():
    m = metrics.set_metrics(_records(20, judged=20, refusal=False))
    assert m["over_refusal"] == 0.0 and m["over_refusal_n"] == 20
    assert metrics.judge_failure_warnings({"s": m}) == []
    table = metrics.markdown_table({"s": m})
    assert "Warning" not in table and "0.0 [0.0, 16.1] (n=20)" in table
    # 2 of 20 failed: 10% is at the threshold, not above it.
    assert metrics.judge_failure_warnings({"s": metrics.set_metrics(_records(20, 18))}) == []
