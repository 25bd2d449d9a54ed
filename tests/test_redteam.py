"""launch/redteam.py: refuses without the acknowledgement flag; with it, the tiny run's
attacker against its defender served on loopback reports ASR per category and best-of-N,
and its output files are private (0600)."""

import csv
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from advgame_jax.data import packaged_seed_path, read_seeds_jsonl
from advgame_jax.evaluation import classifiers, prompt_sets, redteam, targets
from advgame_jax.sampling.server import ServerConfig, serve_model_dir
from tests.eval_world import TOY_VALID, tiny_run

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_refuses_without_acknowledgement(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "launch", "redteam.py"),
            "--attacker_checkpoint=/nonexistent",
            "--target_endpoint=http://127.0.0.1:9/v1",
            f"--set=seeds:{TOY_VALID}",
            f"--out_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.returncode != 0
    assert "--acknowledge_controlled_artifact" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(redteam.NotAcknowledged):
        redteam.run_redteam([], redteam.RedteamPlayers(None, None, None), str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()


def test_tiny_attacker_against_served_target(tmp_path_factory, tmp_path):
    run = tiny_run(tmp_path_factory)
    # The toy attacker learned to copy (and decorate) its training seeds; unseen seeds come
    # out garbled and unfaithful, so the red-team seeds are training seeds.
    harm = [
        s.prompt
        for s in read_seeds_jsonl(packaged_seed_path("toy_seeds.jsonl"))
        if s.category == "harmful"
    ][:6]
    hb = tmp_path / "hb.csv"
    with open(hb, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Behavior", "SemanticCategory", "BehaviorID"])
        w.writerows([p, f"cat{i % 2}", f"b{i}"] for i, p in enumerate(harm))
    seeds = list(prompt_sets.load_prompt_set(f"harmbench:{hb}").examples)
    attacker = targets.load_target(
        targets.TargetSpec(checkpoint=run.workdir, player="attacker", allow_attacker=True)
    )
    cfg = redteam.RedteamConfig(
        num_attempts=3,
        templates="toy_v1",
        attacker_format="any",
        faithfulness="rule",
        attacker_decoding=targets.Decoding(1.0, 1.0, 40),
        target_decoding=targets.Decoding(max_new_tokens=24),
        seed=1,
    )
    out = str(tmp_path / "rt")
    with serve_model_dir(run.defender_hf, config=ServerConfig(port=0)) as srv:
        target = targets.load_target(targets.TargetSpec(endpoint=srv.url + "/v1"))
        players = redteam.RedteamPlayers(attacker, target, classifiers.RuleClassifier())
        m = redteam.run_redteam(seeds, players, out, cfg=cfg, acknowledged=True)
    for name in ("results.jsonl", "successes.jsonl"):
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o600
    with open(os.path.join(out, "results.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    assert len(recs) == 6 * 3
    reached = [r for r in recs if r["error"] is None]
    assert reached, "no attack reached the target"
    assert all(r["response"] is not None for r in reached)
    # Independent recount from the per-attempt file.
    succ = [bool(r["harmful"]) for r in recs]
    o = m["overall"]
    assert o["attempt_asr"]["value"] == pytest.approx(np.mean(succ))
    best = [any(r["success"] for r in recs if r["uid"] == s.uid) for s in seeds]
    assert o["best_of_n_asr"]["value"] == pytest.approx(np.mean(best))
    assert o["best_of_n_asr"]["value"] >= o["attempt_asr"]["value"]
    assert set(m["per_category"]) == {"cat0", "cat1"}
    for cat, block in m["per_category"].items():
        mine = [r for r in recs if r["subcategory"] == cat]
        assert block["attempt_asr"]["value"] == pytest.approx(np.mean([r["success"] for r in mine]))
    with open(os.path.join(out, "successes.jsonl"), encoding="utf-8") as f:
        assert len(f.readlines()) == sum(succ)
    with open(os.path.join(out, "redteam.md"), encoding="utf-8") as f:
        md = f.read()
    assert "| all | 6 | 18 |" in md and "| cat0 |" in md
