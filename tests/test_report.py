"""launch/report.py on a real tiny run and two evaluations (the initial defender and the
trained checkpoint): valid PNGs with the expected series, a markdown summary linking them,
lm-eval results folded in, and a clear error without matplotlib."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from advgame_jax.data import read_seeds_jsonl
from advgame_jax.evaluation import classifiers, prompt_sets, report, runner, targets
from tests.eval_world import TOY_VALID, tiny_run

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNGS = ("rewards.png", "errors.png", "losses.png", "time.png", "validation.png", "frontier.png")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    run = tiny_run(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("report")
    seeds = read_seeds_jsonl(TOY_VALID)
    small = tmp / "small.jsonl"
    with open(small, "w", encoding="utf-8") as f:
        for s in [s for s in seeds if s.category == "harmful"][:4] + [
            s for s in seeds if s.category == "benign"
        ][:4]:
            f.write(json.dumps({"prompt": s.prompt, "category": s.category}) + "\n")
    sets = prompt_sets.load_prompt_sets([f"toy=seeds:{small}"])
    step_dir = targets.find_step_dir(run.workdir)
    evals = []
    for name, target in (
        (
            "initial",
            targets.load_target(
                targets.TargetSpec(hf_dir=targets.resolve_base_hf_dir(step_dir, "defender"))
            ),
        ),
        ("trained", targets.load_target(targets.TargetSpec(checkpoint=run.workdir))),
    ):
        out = str(tmp / name)
        runner.run_eval(
            sets,
            target,
            classifiers.RuleClassifier(),
            out,
            runner.EvalSettings(decoding=targets.Decoding(max_new_tokens=24), num_resamples=200),
        )
        evals.append(os.path.join(out, "eval.json"))
    lm = tmp / "lmeval.json"
    lm.write_text(json.dumps({"results": {"ifeval": {"prompt_level_strict_acc,none": 0.25}}}))
    out = str(tmp / "report")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "launch", "report.py"),
            f"--workdir={run.workdir}",
            *(f"--eval={e}" for e in evals),
            f"--lmeval={lm}",
            f"--out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, run


def test_pngs_are_valid_images(report_dir):
    out, _ = report_dir
    for name in PNGS:
        with Image.open(os.path.join(out, name)) as im:
            assert im.format == "PNG" and im.size[0] >= 500 and im.size[1] >= 300
            px = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert px.std() > 5.0, f"{name} looks blank"
        assert len(np.unique(px.reshape(-1, 3), axis=0)) > 20, f"{name} has no drawing"


def test_expected_series_and_summary(report_dir, tmp_path):
    out, run = report_dir
    with open(os.path.join(run.workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    drawn = report.plot_training(records, str(tmp_path))
    assert drawn["rewards.png"] == [
        "attacker harmful",
        "attacker benign",
        "defender harmful",
        "defender benign",
    ]
    assert drawn["validation.png"] == [
        "defender harmful",
        "defender benign",
        "ASR (harmful)",
        "compliance (benign)",
    ]
    assert len(drawn["losses.png"]) == 8
    assert {"attacker_generation", "defender_generation", "update", "judging"} <= set(
        drawn["time.png"]
    )
    assert report.series(records, "valid/harmful/reward")[0] == [0, 2]
    # Stage times are kept on validated steps too (step 2 validates).
    assert report.series(records, "time/update")[0] == [1, 2]
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        md = f.read()
    for name in PNGS:
        assert f"]({name})" in md
    assert "## Evaluation `initial`" in md and "## Evaluation `trained`" in md
    assert "| ifeval | prompt_level_strict_acc | 0.25 |" in md
    pts = report.frontier_points(
        {"a": {"sets": {"h": {"asr": 0.2}, "b": {"benign_compliance": 0.9, "asr": None}}}}
    )
    assert pts == [
        {
            "eval": "a",
            "harmful_set": "h",
            "benign_set": "b",
            "asr": 0.2,
            "compliance": 0.9,
            "asr_ci": None,
            "compliance_ci": None,
        }
    ]


def test_missing_matplotlib_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(report.ReportError, match=r"pip install -e '\.\[report\]'"):
        report.build_report(str(tmp_path), eval_paths=["x"])
    with pytest.raises(report.ReportError, match="no metrics.jsonl"):
        report.read_metrics(str(tmp_path))
