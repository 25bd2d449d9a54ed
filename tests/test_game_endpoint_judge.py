"""The LLM judge over OpenAI-compatible endpoints, against scripted HTTP servers on 127.0.0.1
(tests/fake_judge_server.py): round-robin, retries, timeouts, HTTP 500, malformed JSON,
garbage answers, the start-up checks (reachable, judge.model served, probes that parse), the
failure-rate warning from the first batch, and every sampling field in the request body."""

import socket

import ml_collections
import pytest

from advgame_jax.data import Seed
from advgame_jax.game import (
    EndpointBackend,
    GameConfig,
    JudgeEndpointError,
    LLMJudge,
    PairRequest,
    build_tree,
    get_template_set,
    make_judge,
    tree_metrics,
)
from advgame_jax.game.tree import XError, YError
from tests.fake_judge_server import FakeJudgeServer, marker_script
from tests.game_stubs import ByteTokenizer, ScriptedSampler

TOK = ByteTokenizer()
TEMPLATES = get_template_set("advgame_v1")


def _judge_settings(judge_config):
    """The typed ``judge`` section of a judge ConfigDict: what the runner hands ``make_judge``."""
    from advgame_jax.experiment.validate import settings_from_config

    return settings_from_config({"judge": judge_config}, complete=False).judge


def _judge(urls, sleeps=None, **kw):
    opts = dict(
        timeout_s=0.3,
        max_retries=1,
        concurrency=8,
        backoff_s=0.01,
        seed=0,
        sleep=(sleeps.append if sleeps is not None else (lambda s: None)),
    )
    opts.update(kw)
    return LLMJudge(EndpointBackend(urls, "judge-model", **opts), TEMPLATES)


def _play(judge, seeds, attacks, responses, cfg):
    return build_tree(
        seeds,
        cfg,
        judge=judge,
        attacker=ScriptedSampler(lambda p, i: attacks[p][i]),
        attacker_tokenizer=TOK,
        defender=ScriptedSampler(lambda p, i: responses[p][i]),
        defender_tokenizer=TOK,
    )


class _SeedKeyed(dict):
    """Attacker script keyed by the seed found in the attacker prompt."""

    def __getitem__(self, prompt):
        return next(v for k, v in self.items() if f"<query>\n{k}\n</query>" in prompt)


def test_pairwise_tree_round_robin_over_two_endpoints():
    seeds = [Seed("s harmful", "harmful")]
    attacks = _SeedKeyed({"s harmful": ["x0 FAITH=True", "x1 FAITH=True"]})
    responses = {
        "x0 FAITH=True": ["y0 SCORE=7", "y1 SCORE=3", "y2 SCORE=5"],
        "x1 FAITH=True": ["y3 SCORE=2", "y4 SCORE=8", "y5 SCORE=8"],
    }
    cfg = GameConfig(num_attacks=2, num_responses=3, attacker_format="any")
    served = ("judge-model",)
    with (
        FakeJudgeServer(marker_script(), served) as s1,
        FakeJudgeServer(marker_script(), served) as s2,
    ):
        judge = _judge([s1.url, s2.url], api_key="k-secret")
        judge.backend.check_endpoints()
        scored = _play(judge, seeds, attacks, responses, cfg)
        hits = (s1.hits, s2.hits)
        auth = {r["auth"] for r in s1.requests + s2.requests}
        models = {r["body"]["model"] for r in s1.requests + s2.requests}
    assert scored.per_response("raw_reward") == (((7.0, 3.0, 5.0), (2.0, 8.0, 8.0)),)
    assert scored.per_attack("selected_d") == ((0, 1),)
    assert scored.per_attack("raw_reward") == ((7.0, 8.0),)
    # 2 faithfulness + 3 + 3 defender pairs + 1 attacker pair = 9 requests, balanced.
    assert sorted(hits) == [4, 5]
    assert auth == {"Bearer k-secret"} and models == {"judge-model"}
    assert "k-secret" not in repr(judge.backend)
    assert tree_metrics(scored)["judge/defender/requests"] == 6.0


def test_faulty_endpoint_gives_bad_judge_errors_and_counts():
    seeds = [Seed("s harmful", "harmful"), Seed("s benign", "benign")]
    attacks = _SeedKeyed(
        {
            "s harmful": ["x0 FAITH=True", "x1 FAULT_JSON"],
            "s benign": ["x2 FAITH=True", "x3 FAITH=False"],
        }
    )
    responses = {
        "x0 FAITH=True": ["y0 SCORE=7", "y1 FAULT_500", "y2 FAULT_TIMEOUT"],
        "x2 FAITH=True": ["y3 FAULT_GARBAGE", "y4 SCORE=4 FAULT_ONCE", "y5 SCORE=9"],
    }
    cfg = GameConfig(num_attacks=2, num_responses=3, attacker_format="any", judge_mode="pointwise")
    sleeps = []
    with FakeJudgeServer(marker_script(timeout_sleep=1.0)) as server:
        scored = _play(_judge([server.url], sleeps), seeds, attacks, responses, cfg)
        hits = dict(server.hits_by_prompt)
    bd, pnv = YError.BAD_DEF_JUDGE, YError.PROMPT_NOT_VALID
    assert scored.per_attack("error") == (
        (None, XError.BAD_FAITH_JUDGE),
        (None, XError.NOT_FAITHFUL),
    )
    assert scored.per_attack("reward") == ((7.0, None), (9.0, -1.0))
    assert scored.per_response("error") == (
        ((None, bd, bd), (pnv,) * 3),
        ((bd, None, None), (pnv,) * 3),
    )
    assert scored.per_response("reward") == (
        ((7.0, None, None), (None,) * 3),
        ((None, 4.0, 9.0), (None,) * 3),
    )
    m = tree_metrics(scored)
    assert {k: v for k, v in m.items() if k.startswith("judge/faults/")} == {
        "judge/faults/failed_requests": 3.0,  # x1 faithfulness, y1, y2
        "judge/faults/http_5xx": 3.0,  # y1 twice, y4 once
        "judge/faults/malformed_json": 2.0,  # x1 twice
        # timeout_s is wall-clock per request, retries included: y2's one timeout used it up.
        "judge/faults/retries": 3.0,  # x1, y1, y4
        "judge/faults/timeout": 1.0,  # y2 once
        "judge/faults/unparsable": 1.0,  # y3 (garbage is not retried)
    }
    assert m["judge/defender/failures"] == 3.0 and m["judge/faith/failures"] == 1.0
    # Retries really went to the server: first try + one retry for failing prompts.
    by_marker = {
        mk: n
        for p, n in hits.items()
        for mk in ("FAULT_500", "FAULT_ONCE", "FAULT_GARBAGE", "FAULT_JSON")
        if mk in p
    }
    assert by_marker == {"FAULT_500": 2, "FAULT_ONCE": 2, "FAULT_GARBAGE": 1, "FAULT_JSON": 2}
    # Exponential backoff with jitter in [1, 2): attempt 0 -> [0.01, 0.02).
    assert len(sleeps) == 3 and all(0.01 <= s < 0.02 for s in sleeps)  # none after y2's timeout


def test_backoff_grows_and_is_seeded():
    def run(seed):
        sleeps = []
        with FakeJudgeServer(lambda prompt, hit: ("status", 503)) as server:
            backend = EndpointBackend(
                [server.url],
                "m",
                timeout_s=1.0,
                max_retries=3,
                backoff_s=0.1,
                seed=seed,
                sleep=sleeps.append,
            )
            assert backend.complete(["p"]) == [None]
            assert server.hits == 4
        return sleeps, backend.fault_counts()

    sleeps, faults = run(7)
    assert faults == {"http_5xx": 4, "retries": 3, "failed_requests": 1}
    for k, s in enumerate(sleeps):
        assert 0.1 * 2**k <= s < 0.2 * 2**k
    assert run(7)[0] == sleeps and run(8)[0] != sleeps


def test_client_errors_are_not_retried():
    with FakeJudgeServer(lambda prompt, hit: ("status", 400)) as server:
        backend = EndpointBackend(
            [server.url], "m", timeout_s=1.0, max_retries=3, sleep=lambda s: None
        )
        assert backend.complete(["a", "b"]) == [None, None]
        assert server.hits == 2
    assert backend.fault_counts() == {"http_4xx": 2, "failed_requests": 2}


def _closed_port_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/v1"


def test_unreachable_endpoint_fails_fast_with_its_url():
    dead = _closed_port_url()
    with FakeJudgeServer(marker_script()) as live:
        backend = EndpointBackend([live.url, dead], "m", timeout_s=1.0)
        with pytest.raises(JudgeEndpointError) as info:
            backend.check_endpoints()
    msg = str(info.value)
    assert f"{dead}/models" in msg and live.url not in msg
    # Inside a step the same dead endpoint only yields None and counts.
    backend = EndpointBackend([dead], "m", timeout_s=1.0, max_retries=1, sleep=lambda s: None)
    assert backend.complete(["p"]) == [None]
    assert backend.fault_counts() == {"connection": 2, "retries": 1, "failed_requests": 1}


def test_endpoint_config_errors():
    with pytest.raises(JudgeEndpointError, match="http"):
        EndpointBackend(["host:8000/v1"], "m")
    with pytest.raises(JudgeEndpointError, match="at least one"):
        EndpointBackend([], "m")
    with pytest.raises(JudgeEndpointError, match="model"):
        EndpointBackend(["http://127.0.0.1:1/v1"], "")


def test_make_judge_from_config(monkeypatch):
    cfg = ml_collections.ConfigDict(
        dict(
            backend="endpoint",
            endpoints=(),
            model="judge-model",
            api_key_env="ADVGAME_TEST_JUDGE_KEY",
            timeout_s=2.0,
            max_retries=0,
            concurrency=4,
            temperature=0.0,
            max_new_tokens=64,
        )
    )
    with pytest.raises(JudgeEndpointError, match="ADVGAME_TEST_JUDGE_KEY"):
        make_judge(_judge_settings(cfg))
    monkeypatch.setenv("ADVGAME_TEST_JUDGE_KEY", "k2")
    cfg.endpoints = (_closed_port_url(),)
    with pytest.raises(JudgeEndpointError, match="unreachable"):
        make_judge(_judge_settings(cfg))
    with FakeJudgeServer(marker_script(), models=("judge-model",)) as server:
        cfg.endpoints = (server.url,)
        judge = make_judge(_judge_settings(cfg))
        from advgame_jax.game.judge import PointRequest

        assert judge.pointwise([PointRequest("compliance", "q", "SCORE=6")]) == [6.0]
        assert server.requests[-1]["auth"] == "Bearer k2"
        assert server.requests[-1]["body"]["max_tokens"] == 64
    cfg.backend = "rule"
    assert type(make_judge(_judge_settings(cfg))).__name__ == "RuleJudge"


def test_wall_clock_timeout_stops_a_trickling_server():
    """timeout_s bounds a whole request, retries included, even when bytes keep arriving."""
    import time

    with FakeJudgeServer(lambda prompt, hit: ("trickle", 0.05, "<score>5</score>" * 20)) as server:
        backend = EndpointBackend([server.url], "m", timeout_s=0.6, max_retries=5, backoff_s=0.01)
        t0 = time.monotonic()
        assert backend.complete(["p"]) == [None]
        elapsed = time.monotonic() - t0
    assert elapsed < 1.5, elapsed  # the body alone would take > 15 s; 5 retries even longer
    faults = backend.fault_counts()
    assert faults["timeout"] >= 1 and faults["failed_requests"] == 1


def test_requests_spread_over_replicas_bounded_in_flight():
    slow = lambda prompt, hit: ("sleep", 0.15, "<score>5</score>")  # noqa: E731
    with FakeJudgeServer(slow) as s1, FakeJudgeServer(slow) as s2, FakeJudgeServer(slow) as s3:
        backend = EndpointBackend(
            [s1.url, s2.url, s3.url],
            "m",
            timeout_s=10.0,
            concurrency=9,
            max_in_flight_per_endpoint=2,
        )
        out = backend.complete([f"p{i}" for i in range(18)])
        servers = (s1, s2, s3)
    assert out == ["<score>5</score>"] * 18
    assert sorted(s.hits for s in servers) == [6, 6, 6]
    peaks = [h["peak_in_flight"] for h in backend.endpoint_health()]
    assert peaks == [2, 2, 2]  # the per-replica bound held, and every replica was used at once
    assert min(s.max_in_flight for s in servers) >= 2  # the servers really saw them overlap


def test_unhealthy_replica_is_avoided_and_failure_rate_warns(caplog):
    import logging

    ok = lambda prompt, hit: ("ok", "<score>5</score>")  # noqa: E731
    with FakeJudgeServer(ok) as good, FakeJudgeServer(lambda p, h: ("status", 503)) as bad:
        backend = EndpointBackend(
            [bad.url, good.url],
            "m",
            timeout_s=5.0,
            max_retries=2,
            concurrency=1,
            backoff_s=0.0,
            unhealthy_after=2,
            unhealthy_cooldown_s=60.0,
            warn_every=2,
            warn_failure_rate=0.1,
        )
        assert backend.complete([f"a{i}" for i in range(6)]) == ["<score>5</score>"] * 6
        bad_hits = bad.hits
        health = {h["endpoint"]: h for h in backend.endpoint_health()}
    assert bad_hits == 2  # two failures made it unhealthy; nothing more was sent to it
    assert not health[bad.url]["healthy"] and health[good.url]["healthy"]

    # A judge failing most requests logs a visible warning from its first batch, then at most
    # once per window of batches.
    with FakeJudgeServer(lambda p, h: ("status", 500)) as down:
        backend = EndpointBackend(
            [down.url], "m", timeout_s=5.0, max_retries=0, warn_every=2, warn_failure_rate=0.1
        )
        with caplog.at_level(logging.WARNING, logger="advgame_jax.judge"):
            for _ in range(4):
                backend.complete(["x", "y"])
    warnings = [r.getMessage() for r in caplog.records if "JUDGE FAILURE RATE" in r.getMessage()]
    assert len(warnings) == 2 and backend.warnings_logged == 2
    assert "100.0% over the last 1 batch (2 of 2 requests failed" in warnings[0]
    assert "100.0% over the last 2 batches (4 of 4 requests failed" in warnings[1]
    assert f"{down.url} UNHEALTHY (6/6 attempts failed)" in warnings[1]


def test_out_of_range_scores_are_counted_not_silently_clipped():
    from advgame_jax.game.judge import PairRequest

    class Fixed:
        def complete(self, prompts):
            return [
                "<score_A>12</score_A><score_B>7</score_B>",
                "<score_A>-3</score_A><score_B>11/10</score_B>",
                "<score_A>4</score_A><score_B>6</score_B>",
            ][: len(prompts)]

        def fault_counts(self):
            return {}

    judge = LLMJudge(Fixed(), TEMPLATES)
    scores = judge.pairwise([PairRequest("compliance", "q", "r1", "r2")] * 3)
    # Reference rules: a negative score is malformed (that judgment fails, counted as
    # unparsable); numbers above 10 are clipped and counted.
    assert scores == [(10.0, 7.0), (None, None), (4.0, 6.0)]
    assert judge.fault_counts()["score_out_of_range"] == 2
    assert judge.fault_counts()["unparsable"] == 1


def test_paper_judge_decoding_reaches_the_endpoint():
    """The reference judge samples with temperature 0.6 and top-p 0.9: both are sent."""
    from advgame_jax.experiment.configs.paper import paper_config

    jc = paper_config("qwen", "dpo_md").judge
    with FakeJudgeServer(marker_script(), models=("judge-model",)) as s:
        jc.endpoints = (s.url,)
        jc.model = "judge-model"
        judge = make_judge(_judge_settings(jc), templates="advgame_v1")
        judge.pairwise([PairRequest("compliance", "q", "a SCORE=3", "b SCORE=4")])
        body = s.requests[-1]["body"]
    assert body["temperature"] == 0.6 and body["top_p"] == 0.9
    with pytest.raises(JudgeEndpointError, match="top_p"):
        EndpointBackend(["http://127.0.0.1:9/v1"], "m", top_p=0.0)


def test_judge_model_must_be_served_one_error_naming_the_field(monkeypatch):
    """issue 22.1: a judge.model the server does not serve fails at start-up (it used to get an
    HTTP 404 on every call, counted as judge failures, with no warning)."""
    from advgame_jax.errors import UserError

    cfg = ml_collections.ConfigDict(
        dict(
            backend="endpoint",
            endpoints=(),
            model="Qwen2.5-32B-Instruct",
            api_key_env="",
            timeout_s=2.0,
            max_retries=0,
            concurrency=4,
            temperature=0.0,
            max_new_tokens=64,
        )
    )
    with (
        FakeJudgeServer(marker_script(), models=("smollm2", "other")) as s1,
        FakeJudgeServer(marker_script(), models=("Qwen2.5-32B-Instruct",)) as s2,
    ):
        cfg.endpoints = (s2.url, s1.url)
        with pytest.raises(JudgeEndpointError) as info:
            make_judge(_judge_settings(cfg))
        posts = s1.hits + s2.hits
    msg = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in msg
    assert "config.judge.model='Qwen2.5-32B-Instruct' is not served" in msg
    assert f"{s1.url} serves ['smollm2', 'other']" in msg and s2.url not in msg
    assert posts == 0  # refused before any judge request


def test_startup_probes_warn_with_the_raw_reply(caplog):
    """issue 22.1: one faithfulness and one pairwise probe; an answer that does not parse is a
    warning with its raw reply's first 200 characters and the config fields to look at."""
    import logging

    cfg = ml_collections.ConfigDict(
        dict(
            backend="endpoint",
            endpoints=(),
            model="judge",
            api_key_env="",
            timeout_s=5.0,
            max_retries=0,
            concurrency=4,
            temperature=0.0,
            max_new_tokens=64,
        )
    )
    rambling = "I think both answers are fine. " * 20  # 620 characters, no tags

    def half_broken(prompt, hit):  # faithfulness parses, pairwise does not
        if "<rewritten_prompt>" in prompt:
            return ("ok", "<answer>True</answer>")
        return ("ok", rambling)

    for script, expected in ((marker_script(), []), (half_broken, ["pairwise"])):
        caplog.clear()
        with FakeJudgeServer(script) as s:
            cfg.endpoints = (s.url,)
            with caplog.at_level(logging.WARNING, logger="advgame_jax.judge"):
                judge = make_judge(_judge_settings(cfg))
            probes = s.hits
        warned = [r.getMessage() for r in caplog.records if "start-up probe" in r.getMessage()]
        assert probes == 2 and len(warned) == len(expected)
        assert judge.fault_counts() == {}  # probes are not judge faults
        for kind, msg in zip(expected, warned):
            assert f"the {kind} answer of 'judge' does not parse" in msg
            assert repr(rambling[:200]) in msg and rambling[:201] not in msg
            assert "config.judge.max_new_tokens" in msg and "config.game.templates" in msg
    # A probe request that fails outright is named too (HTTP status and body excerpt).
    caplog.clear()
    with FakeJudgeServer(lambda p, h: ("status", 400, b'{"error": "max_tokens too large"}')) as s:
        cfg.endpoints = (s.url,)
        with caplog.at_level(logging.WARNING, logger="advgame_jax.judge"):
            make_judge(_judge_settings(cfg))
    warned = [r.getMessage() for r in caplog.records if "start-up probe" in r.getMessage()]
    assert len(warned) == 2 and all("HTTP 400" in w and "max_tokens too large" in w for w in warned)


def test_first_failing_batch_warns_with_the_default_window(caplog):
    """issue 22.2: with the default warn_every=10, a judge failing every call is named after
    its first batch (it used to take 10 batches)."""
    import logging

    with FakeJudgeServer(lambda p, h: ("status", 404, b'{"error": "model not found"}')) as s:
        backend = EndpointBackend([s.url], "m", timeout_s=5.0, max_retries=0)
        with caplog.at_level(logging.WARNING, logger="advgame_jax.judge"):
            assert backend.complete(["a", "b", "c"]) == [None] * 3
    warned = [r.getMessage() for r in caplog.records if "JUDGE FAILURE RATE" in r.getMessage()]
    assert len(warned) == 1 and backend.warnings_logged == 1
    assert "100.0% over the last 1 batch (3 of 3 requests failed" in warned[0]
    assert "'http_4xx': 3" in warned[0]


def test_judge_requests_send_every_sampling_field():
    """issue 17.23: a vLLM server fills unset sampling fields from the model's
    generation_config.json, so every one is sent explicitly (neutral values)."""
    with FakeJudgeServer(marker_script()) as s:
        EndpointBackend([s.url], "judge", temperature=0.6, top_p=0.9, max_tokens=77).complete(["p"])
        EndpointBackend([s.url], "judge", explicit_sampling=False).complete(["q"])
        bodies = [r["body"] for r in s.requests]
    assert bodies[0] == {
        "model": "judge",
        "messages": [{"role": "user", "content": "p"}],
        "temperature": 0.6,
        "top_p": 0.9,
        "max_tokens": 77,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }
    assert bodies[1] == {
        "model": "judge",
        "messages": [{"role": "user", "content": "q"}],
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 8192,
    }
