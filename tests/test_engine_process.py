"""Engine servers without vLLM: a failed start, a missing key and a bad address are clear
errors naming the engine; a request to a silent engine times out instead of hanging; the
weight refresh is pause → every worker loads → reset prefix cache → label version → resume
(resume even when the load fails); completions carry vLLM's weight-version spans and ones
from other weights than the last sync are refused."""

import http.server
import json
import os
import socket
import threading
import time

import pytest

from advgame_jax.experiment.players import StaleWeightsError, VersionedSampler
from advgame_jax.models import ModelConfig
from advgame_jax.sampling.base import Completion, SamplingParams, SyncCheckpoint
from advgame_jax.sampling.engines import EngineClient, EngineError, EngineSpec, RemoteSampler
from advgame_jax.sampling.weight_sync import COMMIT_FILE

CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=32,
)


def test_library_no_longer_imports_a_pickle_rpc():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "advgame_jax"
    users = [str(p) for p in root.rglob("*.py") if "multiprocessing.connection" in p.read_text()]
    assert users == []


def test_engine_that_fails_to_start_is_named_with_its_log(tmp_path):
    t0 = time.monotonic()
    client = EngineClient.spawn(
        EngineSpec(role="attacker", hf_dir=str(tmp_path / "missing")),
        str(tmp_path / "engines"),
        startup_timeout_s=300,
    )
    with pytest.raises(
        EngineError,
        match=r"attacker engine \(pid \d+, http://127\.0\.0\.1:\d+\)"
        r": exited with code \d+ while starting; its log: "
        r".*attacker\.log",
    ):
        client.request("GET", "/health")
    assert time.monotonic() - t0 < 300
    log = tmp_path / "engines" / "attacker.log"
    assert "missing" in log.read_text()  # vLLM's own error is in its log
    assert os.stat(log).st_mode & 0o077 == 0
    info = json.loads((tmp_path / "engines" / "attacker.engine.json").read_text())
    assert info["pid"] == client.proc.pid and info["log"] == str(log)
    client.close()


def test_connect_errors_name_the_field(monkeypatch):
    with pytest.raises(EngineError, match=r"config\.defender\.engine\.address.*'host:port'"):
        EngineClient.connect("defender", "nohost", "K")
    monkeypatch.delenv("ADVGAME_TEST_KEY", raising=False)
    with pytest.raises(EngineError, match=r"engine\.authkey_env.*ADVGAME_TEST_KEY is empty"):
        EngineClient.connect("defender", "127.0.0.1:1", "ADVGAME_TEST_KEY")
    with pytest.raises(
        EngineError,
        match=r"defender engine \(http://127\.0\.0\.1:1\): "
        r"'/health' failed",
    ):
        EngineClient.connect("defender", "127.0.0.1:1")


def test_silent_engine_times_out_instead_of_hanging():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    client = EngineClient("defender", f"http://127.0.0.1:{port}", request_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"defender engine .*'/inference/v1/generate' failed"):
        client.request("POST", "/inference/v1/generate", {"token_ids": [1]})
    assert time.monotonic() - t0 < 3
    client.close()
    listener.close()


class _FakeEngine(http.server.BaseHTTPRequestHandler):
    """vLLM's routes as the client uses them; records the order of the refresh calls."""

    calls: list = []
    version = "default"
    load_answer = None  # None: the version of the checkpoint; else this value
    max_model_len = 20  # the context /v1/models reports

    def log_message(self, *args):
        pass

    def _send(self, body):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/weight_info":
            return self._send({"weight_version": type(self).version})
        if self.path == "/v1/models":
            return self._send(
                {"data": [{"id": "defender", "max_model_len": type(self).max_model_len}]}
            )
        return self._send(None)

    def do_POST(self):
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0)) or b"null")
        cls.calls.append(self.path.split("?")[0])
        if self.path == "/collective_rpc":
            path = body["args"][0]
            v = json.load(open(os.path.join(path, COMMIT_FILE)))["version"]
            return self._send(
                {"results": [str(cls.load_answer if cls.load_answer is not None else v)]}
            )
        if self.path == "/update_weight_version":
            cls.version = body["new_version"]
        if self.path == "/inference/v1/generate":
            ids = body["token_ids"]
            n = body["sampling_params"]["n"]
            return self._send(
                {
                    "choices": [
                        {
                            "index": i,
                            "token_ids": [ids[-1], 7],
                            "finish_reason": "stop",
                            "logprobs": {
                                "content": [
                                    {"token_id": ids[-1], "logprob": -0.5},
                                    {"token_id": 7, "logprob": -0.25},
                                ]
                            },
                            "weight_versions": [{"version": cls.version, "start": 0, "end": 2}],
                        }
                        for i in range(n)
                    ]
                }
            )
        return self._send(None)


@pytest.fixture
def fake_engine():
    _FakeEngine.calls, _FakeEngine.version, _FakeEngine.load_answer = [], "default", None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _commit(tmp_path, version):
    d = tmp_path / f"v{version:08d}"
    d.mkdir()
    (d / COMMIT_FILE).write_text(json.dumps({"version": version}))
    return str(d)


def test_refresh_sequence_versions_and_budget(fake_engine, tmp_path):
    sampler = RemoteSampler(EngineClient("defender", fake_engine), CONFIG)
    assert sampler.weights_version is None and sampler.max_model_len == 20
    assert sampler.prompt_budget == 19  # the engine's context less one token
    assert sampler.load_weights(SyncCheckpoint(_commit(tmp_path, 3), version=3)) == 3
    assert _FakeEngine.calls == [
        "/pause",
        "/collective_rpc",
        "/reset_prefix_cache",
        "/update_weight_version",
        "/resume",
    ]
    sp = SamplingParams(temperature=0.0, max_new_tokens=4, n=2, stop_token_ids=(7,))
    out = sampler.generate([[1, 2], [5] * 17, [9]], sp)  # the second is over 20 tokens
    assert [c.token_ids for c in out] == [(2, 7), (2, 7), (), (), (9, 7), (9, 7)]
    assert out[0].logprobs == (-0.5, -0.25) and out[0].finish_reason == "stop"
    assert out[2].finish_reason == "length" and sampler.stats()["prompt_too_long"] == 1
    assert {c.weights_version for c in out} == {3}

    _FakeEngine.calls.clear()
    _FakeEngine.load_answer = 2  # a worker that loaded something else
    with pytest.raises(
        EngineError,
        match=r"defender engine .*loaded weights versions \[2\].*"
        r"expected 4",
    ):
        sampler.load_weights(SyncCheckpoint(_commit(tmp_path, 4), version=4))
    assert _FakeEngine.calls == ["/pause", "/collective_rpc", "/resume"]  # resumed anyway
    assert sampler.weights_version == 3 and sampler.stats()["loads"] == 1


class _Inner:
    def __init__(self, version):
        self.version = version

    def generate(self, prompts, params):
        return [
            Completion((1,), "", (0.0,), "length", weights_version=self.version) for _ in prompts
        ]


class _Player:
    role, weights_version = "attacker", 3


def test_completions_from_stale_weights_are_refused():
    player = _Player()
    ok = VersionedSampler(_Inner(3), player).generate([[1]], SamplingParams())
    assert ok[0].weights_version == 3
    with pytest.raises(StaleWeightsError, match="weights version 2.*last sync was version 3"):
        VersionedSampler(_Inner(2), player).generate([[1]], SamplingParams())
    stamped = VersionedSampler(_Inner(None), player).generate([[1]], SamplingParams())
    assert stamped[0].weights_version == 3  # in-process samplers get the sync's version


def test_spawned_engine_gets_sigterm_when_its_trainer_dies(tmp_path):
    """The launcher of ``EngineClient.spawn`` (no vLLM: it execs a sleeper here)."""
    import signal
    import subprocess
    import sys

    pid_file = tmp_path / "engine.pid"
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import os, subprocess, sys, time\n"
                "from advgame_jax.sampling.engines import _LAUNCHER\n"
                "p = subprocess.Popen([sys.executable, '-c', _LAUNCHER, str(os.getpid()), '-c', "
                "'import time; time.sleep(120)'], start_new_session=True)\n"
                f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
                "time.sleep(120)\n"
            ),
        ]
    )
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    engine = int(pid_file.read_text())
    time.sleep(1.0)  # the launcher has exec'd the sleeper
    assert os.getsid(engine) == engine != os.getsid(trainer.pid)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    for _ in range(100):
        try:
            os.kill(engine, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(engine, signal.SIGKILL)
        raise AssertionError("the engine outlived its trainer")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("leader_dies_first", [True, False])
def test_close_leaves_nothing_of_the_engine_session(leader_dies_first):
    """A vLLM server runs its engine core as a second process of its session. If the server
    is killed first, that process is left behind, orphaned; if it outlives its server's
    SIGTERM, likewise. ``close`` kills what is left and returns once nothing of the session
    remains. Stand-in: a shell leader with a sleeping child in its session (which, in the
    second case, ignores SIGTERM)."""
    import signal
    import subprocess

    child = "sleep 600" if leader_dies_first else "(trap '' TERM; exec sleep 600)"
    proc = subprocess.Popen(["sh", "-c", f"{child} & wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the child has started
        members = subprocess.run(
            ["ps", "-o", "pid=", "-g", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        if len(members) >= 2:
            break
        time.sleep(0.05)
    if leader_dies_first:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _group_alive(proc.pid)  # the orphan is really there
    t0 = time.monotonic()
    EngineClient("defender", "http://127.0.0.1:9", proc=proc).close(timeout_s=5)
    assert not _group_alive(proc.pid)
    assert time.monotonic() - t0 < 20
