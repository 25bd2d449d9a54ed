"""Engine process supervision without vLLM: a failed start, a missing key and a bad address are
clear errors naming the engine; a request to a silent engine times out instead of hanging;
completions from other weights than the last sync are refused."""

import os
import threading
import time
from multiprocessing.connection import Listener

import pytest

from advgame_jax.experiment.players import StaleWeightsError, VersionedSampler
from advgame_jax.sampling.base import Completion, SamplingParams
from advgame_jax.sampling.engine_process import EngineClient, EngineError, EngineSpec


def test_engine_that_fails_to_start_is_named_with_its_log(tmp_path):
    t0 = time.monotonic()
    client = EngineClient.spawn(EngineSpec(role="attacker", hf_dir=str(tmp_path / "missing")),
                                str(tmp_path / "engines"), startup_timeout_s=120)
    with pytest.raises(EngineError, match=r"attacker engine \(pid \d+.*exited with code 1.*"
                                          r"while starting.*attacker\.log"):
        client.request("health")
    assert time.monotonic() - t0 < 120
    log = (tmp_path / "engines" / "attacker.log").read_text()
    assert "config.json" in log  # the engine's own error is in its log
    assert os.stat(tmp_path / "engines" / "attacker.log").st_mode & 0o077 == 0
    client.close()


def test_connect_errors_name_the_field(monkeypatch):
    with pytest.raises(EngineError, match="expected 'host:port'"):
        EngineClient.connect("defender", "nohost", "K")
    monkeypatch.delenv("ADVGAME_TEST_KEY", raising=False)
    with pytest.raises(EngineError, match="ADVGAME_TEST_KEY is empty"):
        EngineClient.connect("defender", "127.0.0.1:1", "ADVGAME_TEST_KEY")
    monkeypatch.setenv("ADVGAME_TEST_KEY", "k")
    with pytest.raises(EngineError, match=r"defender engine .*cannot connect"):
        EngineClient.connect("defender", "127.0.0.1:1", "ADVGAME_TEST_KEY")


def test_silent_engine_times_out_instead_of_hanging():
    listener = Listener(("127.0.0.1", 0), authkey=b"k")
    conns = []
    threading.Thread(target=lambda: conns.append(listener.accept()), daemon=True).start()
    client = EngineClient("defender", listener.address, b"k", request_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"defender engine .*no answer to 'generate' within"):
        client.request("generate", ([[1]], {}))
    assert time.monotonic() - t0 < 3
    listener.close()


class _Inner:
    def __init__(self, version):
        self.version = version

    def generate(self, prompts, params):
        return [Completion((1,), "", (0.0,), "length", weights_version=self.version)
                for _ in prompts]


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
