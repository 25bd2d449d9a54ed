"""Multi-host: world detection, hybrid meshes, per-process seeds, and a real two-process run
(2 processes × 4 CPU devices, JAX CPU collectives over loopback) of the sharded update step
whose parameters must equal one process with 8 devices given the same global rows."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from advgame_jax import distributed
from advgame_jax.data.iterator import SeedIterator
from advgame_jax.data.seeds import Seed
from advgame_jax.training.multihost import plan_global

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_slurm_nodelist_first_host():
    assert distributed.first_slurm_host("gpu[03-05,9],cpu1") == "gpu03"
    assert distributed.first_slurm_host("nodeA,nodeB") == "nodeA"
    assert distributed.first_slurm_host("n[7]") == "n7"


def test_detect_world_sources_and_errors():
    assert distributed.detect_world({}) is None
    assert distributed.detect_world({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    w = distributed.detect_world(
        {
            "SLURM_NTASKS": "16",
            "SLURM_PROCID": "9",
            "SLURM_STEP_NODELIST": "h[10-11]",
            "ADVGAME_COORDINATOR_PORT": "9999",
        }
    )
    assert w == distributed.World("h10:9999", 16, 9, "slurm")
    w = distributed.detect_world(
        {
            "ADVGAME_COORDINATOR": "a:1",
            "ADVGAME_NUM_PROCESSES": "2",
            "ADVGAME_PROCESS_ID": "1",
            "SLURM_NTASKS": "8",
        }
    )
    assert w.source == "env" and w.process_id == 1
    assert distributed.detect_world({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}).source == "tpu"
    assert (
        distributed.detect_world({}, coordinator="c:1", num_processes=2, process_id=0).source
        == "config"
    )
    with pytest.raises(distributed.WorldError, match="ADVGAME_PROCESS_ID"):
        distributed.detect_world({"ADVGAME_COORDINATOR": "a:1", "ADVGAME_NUM_PROCESSES": "2"})
    with pytest.raises(distributed.WorldError, match="expected 0"):
        distributed.detect_world(
            {"ADVGAME_COORDINATOR": "a:1", "ADVGAME_NUM_PROCESSES": "2", "ADVGAME_PROCESS_ID": "2"}
        )
    with pytest.raises(distributed.WorldError, match="config.distributed"):
        distributed.detect_world({}, coordinator="c:1", num_processes=2, process_id=5)
    # num_processes alone is an expectation checked after joining, not a world.
    assert distributed.detect_world({}, num_processes=2) is None


def test_axis_sizes_resolution():
    ici, dcn = distributed.resolve_axis_sizes(
        {"fsdp": -1, "tensor": 2}, {"data": 2}, num_devices=16, num_slices=2
    )
    assert ici == {"data": 1, "fsdp": 4, "tensor": 2} and dcn == {"data": 2, "fsdp": 1, "tensor": 1}
    with pytest.raises(distributed.WorldError, match="2 host"):
        distributed.resolve_axis_sizes({"fsdp": 8}, {"data": 4}, num_devices=16, num_slices=2)
    with pytest.raises(distributed.WorldError, match="multiply to 4"):
        distributed.resolve_axis_sizes({"fsdp": 4}, {}, num_devices=8, num_slices=1)


def test_build_mesh_single_host_matches_device_order():
    import jax

    mesh = distributed.build_mesh({"fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]


def test_per_process_seeds_are_disjoint_and_cover_the_global_batch():
    seeds = [Seed(prompt=f"s{i}", category="harmful") for i in range(37)]
    P, per_process = 4, 3
    its = [SeedIterator(seeds, per_process, seed=5, shard_index=k, shard_count=P) for k in range(P)]
    for _ in range(3):  # one epoch of 37 seeds holds 3 batches of 4 × 3 (= 36)
        batches = [[s.prompt for s in it.next_batch()] for it in its]
        flat = [p for b in batches for p in b]
        assert len(flat) == P * per_process and len(set(flat)) == len(flat)


def test_plan_global_agrees_on_rows_and_length():
    local_rows, t = plan_global(np.array([5, 2]), 19, num_processes=2, multiple=8)
    assert (local_rows, t) == (8, 24)  # 5 × 2 = 10 → bucket 16 global rows, 8 each
    with pytest.raises(ValueError, match="processes"):
        plan_global(np.array([1, 1, 1]), 5, num_processes=3, multiple=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs, deadline):
    """Wait for every ``(process, log)`` until ``deadline``; each must exit 0 (else its log's
    tail is the failure message); any still running afterwards is killed."""
    try:
        for p, log in procs:
            rc = p.wait(timeout=max(deadline - time.time(), 1))
            log.close()
            assert rc == 0, open(log.name).read()[-3000:]
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()


def _run_world(tmp_path, name, n_proc, local_devices, extra=(), timeout=300):
    port = _free_port()
    procs = []
    for i in range(n_proc):
        env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        if n_proc > 1:
            env.update(
                ADVGAME_COORDINATOR=f"127.0.0.1:{port}",
                ADVGAME_NUM_PROCESSES=str(n_proc),
                ADVGAME_PROCESS_ID=str(i),
            )
        log = open(tmp_path / f"{name}-{i}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.multihost_worker",
                        "--local_devices",
                        str(local_devices),
                        "--out",
                        str(tmp_path / f"{name}.npz"),
                        *extra,
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    _wait_all(procs, time.time() + timeout)
    with np.load(tmp_path / f"{name}.npz") as z:
        return [z[str(i)] for i in range(len(z.files))]


@pytest.mark.slow
def test_two_processes_equal_one_process_and_checkpoints_reshard(tmp_path):
    two = _run_world(tmp_path, "two", 2, 4, ("--ckpt", str(tmp_path / "ck2")))
    one = _run_world(tmp_path, "one", 1, 8, ("--as_single", "--ckpt", str(tmp_path / "ck1")))
    assert len(two) == len(one)
    diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(two, one))
    assert diff <= 1e-6, diff
    moved = max(float(np.max(np.abs(a))) for a in two)
    assert moved > 0
    logs = "".join(open(tmp_path / f"two-{i}.log").read() for i in range(2))
    assert logs.count("num_pairs=7.0") == 2  # 5 + 2 pairs, the global count on both
    # A checkpoint written by 2 processes restores in 1 process with 8 devices.
    restored = _run_world(
        tmp_path, "restored", 1, 8, ("--ckpt", str(tmp_path / "ck2"), "--restore")
    )
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(two, restored)) == 0.0
    # ... and vice versa: one written by 1 process restores across 2 processes × 4 devices.
    restored = _run_world(
        tmp_path, "restored2", 2, 4, ("--ckpt", str(tmp_path / "ck1"), "--restore")
    )
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(one, restored)) == 0.0


def test_resolve_mesh_dcn_mismatch_is_a_config_error():
    from advgame_jax.experiment.players import resolve_mesh
    from advgame_jax.experiment.validate import ConfigError
    from configs.tiny import get_config

    config = get_config()
    config.mesh.dcn_data = 2  # two hosts asked for, one process here
    with pytest.raises(ConfigError, match="dcn sizes"):
        resolve_mesh(config)
    config.mesh.dcn_data, config.mesh.data, config.mesh.fsdp = 1, 2, 4
    config.mesh.dcn_fsdp = 1
    assert dict(resolve_mesh(config).shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_train_py_refuses_a_world_that_does_not_match_the_config(tmp_path):
    """Two processes join, the config expects four: both stop with one clear error before
    any model loads."""
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            PYTHONPATH=ROOT,
            JAX_PLATFORMS="cpu",
            ADVGAME_COORDINATOR=f"127.0.0.1:{port}",
            ADVGAME_NUM_PROCESSES="2",
            ADVGAME_PROCESS_ID=str(i),
        )
        env.pop("XLA_FLAGS", None)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "launch/train.py",
                    "--config=configs/tiny.py",
                    f"--config.workdir={tmp_path}/run",
                    "--config.distributed.num_processes=4",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode != 0
        assert "config.distributed.num_processes=4 but JAX sees 2 process(es)" in out, out[-2000:]
    assert not os.path.exists(tmp_path / "run")


def _train_world(
    tmp_path, name, workdir, toy_dir, num_steps, *, sigterm_after_step=None, timeout=900
):
    """``launch/train.py`` on configs/tiny.py in 2 processes × 4 CPU devices, FSDP over all 8.

    With ``sigterm_after_step``, process 1 (not the writer) gets SIGTERM once metrics.jsonl
    holds that step."""
    import signal

    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            PYTHONPATH=ROOT,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            ADVGAME_COORDINATOR=f"127.0.0.1:{port}",
            ADVGAME_NUM_PROCESSES="2",
            ADVGAME_PROCESS_ID=str(i),
        )
        log = open(tmp_path / f"{name}-{i}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        "launch/train.py",
                        "--config=configs/tiny.py",
                        f"--config.workdir={workdir}",
                        f"--config.toy_dir={toy_dir}",
                        f"--config.train.num_steps={num_steps}",
                        "--config.mesh.fsdp=8",
                        "--config.mesh.data=1",
                        "--config.train.seeds_per_device=1",
                        "--config.train.validate_every=0",
                        "--config.train.checkpoint_every=1",
                        "--config.logging.progress_bar=False",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    deadline = time.time() + timeout
    try:
        if sigterm_after_step is not None:
            metrics = os.path.join(workdir, "metrics.jsonl")
            while time.time() < deadline and procs[1][0].poll() is None:
                if os.path.exists(metrics) and any(
                    json.loads(ln)["step"] >= sigterm_after_step
                    for ln in open(metrics)
                    if ln.strip()
                ):
                    procs[1][0].send_signal(signal.SIGTERM)
                    break
                time.sleep(0.5)
    finally:
        _wait_all(procs, deadline)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _deterministic(record):
    return {k: v for k, v in record.items() if not k.startswith(("time/", "sys/"))}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_two_process_game_sigterm_and_bit_exact_resume(tmp_path, toy_dir):
    """Three steps of the tiny game over 2 processes: one metrics line per step, written once;
    a SIGTERM to the non-writer process stops both after the same step with one checkpoint;
    the rerun resumes and its records equal the uninterrupted run's exactly."""
    full = tmp_path / "full"
    _train_world(tmp_path, "full", full, toy_dir, 3)
    recs = _records(full)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r.get("harmful/defender/num_pairs") is not None for r in recs)
    assert sorted(os.listdir(full / "checkpoints"))[-1] == "3"

    cut = tmp_path / "cut"
    _train_world(tmp_path, "cut", cut, toy_dir, 3, sigterm_after_step=1)
    stopped = [r["step"] for r in _records(cut)][-1]
    assert stopped < 3, "the run was not stopped by the signal"
    steps = [int(s) for s in os.listdir(cut / "checkpoints") if s.isdigit()]
    assert max(steps) == stopped
    logs = [open(tmp_path / f"cut-{i}.log").read() for i in range(2)]
    assert "signal 15 received" in logs[1]
    assert all(f"stopped cleanly at step {stopped}" in log for log in logs)

    _train_world(tmp_path, "resume", cut, toy_dir, 3)
    resumed = _records(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert [_deterministic(r) for r in resumed] == [_deterministic(r) for r in recs]
