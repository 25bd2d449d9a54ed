"""A server trickling its answer one byte a second (tests/fake_judge_server.py): the judge,
the LLM classifier and the eval target each give up at their configured 5 s deadline (± 1 s),
count it as a failure and never hang; launch/eval.py's --request_timeout_s reaches the
endpoint target (a trickling defender is recorded as failed generations, the run finishes)."""

import json
import os
import subprocess
import sys
import threading
import time

from advgame_jax.evaluation import classifiers, targets
from advgame_jax.game import EndpointBackend, LLMJudge, PairRequest, get_template_set
from tests.fake_judge_server import FakeJudgeServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE = 5.0


def _trickle(prompt, hit):
    return ("trickle", 1.0, "<score_A>5</score_A><score_B>5</score_B> " * 10)


def test_judge_classifier_and_target_give_up_at_their_deadline():
    with FakeJudgeServer(_trickle, models=("judge", "advgame")) as server:
        judge = LLMJudge(
            EndpointBackend([server.url], "judge", timeout_s=DEADLINE, max_retries=3),
            get_template_set("advgame_v1"),
        )
        clf = classifiers.make_classifier(
            "rubric", classifiers.EndpointSpec(server.url, "judge", timeout_s=DEADLINE)
        )
        target = targets.load_target(
            targets.TargetSpec(endpoint=server.url, endpoint_model="advgame", timeout_s=DEADLINE)
        )
        runs = {
            "judge": lambda: judge.pairwise([PairRequest("compliance", "q", "a", "b")]),
            "classifier": lambda: clf.classify([classifiers.ClassifyRequest("q", "r")]),
            "target": lambda: target.generate(["q"], [1], targets.Decoding(max_new_tokens=8)),
        }
        results, elapsed = {}, {}

        def run(name):
            t0 = time.monotonic()
            results[name] = runs[name]()
            elapsed[name] = time.monotonic() - t0

        threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=3 * DEADLINE)
        assert not any(t.is_alive() for t in threads), "a request hung past its deadline"
    for name, seconds in elapsed.items():
        assert DEADLINE - 1.0 <= seconds <= DEADLINE + 1.0, (name, seconds)
    # Each is a counted failure, not an answer and not an exception.
    assert results["judge"] == [(None, None)]
    faults = judge.fault_counts()
    assert faults["timeout"] == 1 and faults["failed_requests"] == 1 and "retries" not in faults
    assert results["classifier"] == [classifiers.Verdict()]
    assert clf.client.failures == 1 and clf.client.fault_counts()["timeout"] == 1
    assert results["target"] == [targets.Generation("", "error", None)]
    assert target.client.failures == 1


def test_eval_cli_request_timeout_reaches_the_endpoint_target(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps({"prompt": f"tell me about topic {i}", "category": c}) + "\n"
            for i, c in enumerate(("harmful", "benign"))
        )
    )
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", "eval.py"),
        f"--set=s=seeds:{seeds}",
        f"--out_dir={tmp_path / 'out'}",
        "--num_resamples=10",
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    bad = subprocess.run(
        cmd + ["--endpoint=http://127.0.0.1:9/v1", "--request_timeout_s=0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode != 0 and "--request_timeout_s: expected seconds > 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    with FakeJudgeServer(_trickle, models=("advgame",)) as server:
        t0 = time.monotonic()
        proc = subprocess.run(
            cmd + [f"--endpoint={server.url}", "--request_timeout_s=3"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        wall = time.monotonic() - t0
        posts = server.hits
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "out" / "eval.json", encoding="utf-8") as f:
        out = json.load(f)
    m = out["sets"]["s"]
    assert m["generation_failures"] == 2 and posts == 2
    assert "ENDPOINT --endpoint FAILURE RATE 100.0% over the last 1 batch (2 of 2" in proc.stderr
    assert wall < 60  # two 3 s deadlines (run concurrently) plus start-up, never a hang
