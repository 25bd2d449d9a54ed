"""One run per directory (advgame_jax/locking.py): a second training run on one workdir, or a
second evaluation on one --out_dir, is refused within seconds naming the holder, and the
first run finishes complete and intact; a holder killed with -9 leaves no lock behind."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from advgame_jax.locking import LOCK_FILE, DirectoryInUseError, DirLock
from tests.fake_judge_server import FakeJudgeServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
HOLD = (
    "import sys, time; sys.path.insert(0, %r); from advgame_jax.locking import DirLock; "
    "DirLock(sys.argv[1], 'config.workdir').acquire(); print('held', flush=True); "
    "time.sleep(120)" % REPO
)


def _wait_for_holder(path, proc, timeout=600.0):
    """Wait until ``proc`` has written its pid into the lock file of ``path``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with open(os.path.join(path, LOCK_FILE), encoding="utf-8") as f:
                if json.loads(f.read() or "{}").get("pid") == proc.pid:
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError("the first process never took the lock")


def test_second_holder_is_refused_and_kill_9_releases(tmp_path):
    d = str(tmp_path / "work")
    holder = subprocess.Popen([PY, "-c", HOLD, d], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryInUseError) as e:
            DirLock(d, "config.workdir").acquire()
        msg = str(e.value)
        assert f"in use by pid {holder.pid} on {socket.gethostname()} (since " in msg
        assert "config.workdir=" in msg and "\n" not in msg
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with DirLock(d, "config.workdir") as lock:  # the kernel dropped the dead holder's lock
            assert lock.held
            with open(os.path.join(d, LOCK_FILE)) as f:
                assert json.load(f)["pid"] == os.getpid()
        assert oct(os.stat(os.path.join(d, LOCK_FILE)).st_mode & 0o777) == "0o600"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_same_host_live_holder_without_flock_is_refused(tmp_path):
    """A lock file naming a live python process on this host counts even where flock did not
    see it (file systems whose flock is local only)."""
    d = tmp_path / "work"
    d.mkdir()
    other = subprocess.Popen([PY, "-c", "import time; time.sleep(60)", "launch/eval.py"])
    try:
        # Until the child has exec'd, /proc shows the forking parent's command line.
        deadline = time.monotonic() + 30
        while b"time.sleep" not in open(f"/proc/{other.pid}/cmdline", "rb").read():
            assert time.monotonic() < deadline, "the child process did not start"
            time.sleep(0.05)
        record = {"pid": other.pid, "host": socket.gethostname(), "since": "then"}
        (d / LOCK_FILE).write_text(json.dumps({**record, "command": "launch/eval.py"}))
        with pytest.raises(DirectoryInUseError, match=f"pid {other.pid}"):
            DirLock(str(d), "--out_dir").acquire()
        # the same pid running another command (a reused pid) is not a holder
        (d / LOCK_FILE).write_text(json.dumps({**record, "command": "launch/train.py x"}))
        DirLock(str(d), "--out_dir").acquire().release()
        (d / LOCK_FILE).write_text(json.dumps({**record, "command": "launch/eval.py"}))
    finally:
        other.kill()
        other.wait()
    # that process is gone: its record is stale and taken over
    with DirLock(str(d), "--out_dir"):
        pass


def _metric_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.mark.slow
def test_two_train_processes_on_one_workdir(tmp_path, toy_dir):
    work = str(tmp_path / "run")
    args = [
        PY,
        os.path.join(REPO, "launch", "train.py"),
        "--config=configs/tiny.py",
        f"--config.workdir={work}",
        f"--config.toy_dir={toy_dir}",
        "--config.train.num_steps=3",
        "--config.train.checkpoint_every=1",
        "--config.train.validate_every=0",
        "--config.logging.progress_bar=False",
        "--config.logging.tensorboard=False",
    ]
    first = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_holder(work, first)
        t0 = time.monotonic()
        second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
        took = time.monotonic() - t0
        assert second.returncode == 2, second.stderr[-2000:]
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and f"in use by pid {first.pid} on" in errors[0], second.stderr[
            -2000:
        ]
        assert "Traceback" not in second.stderr
        assert took < 120, took  # refused at start, before any model loads
        out, err = first.communicate(timeout=900)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert _metric_steps(work) == [1, 2, 3]
    steps = sorted(int(n) for n in os.listdir(os.path.join(work, "checkpoints")) if n.isdigit())
    assert steps[-1] == 3
    with open(os.path.join(work, LOCK_FILE)) as f:
        assert f.read() == ""  # released at the end

    # A torn last line (a kill mid-write) is dropped on rerun with ONE warning (item 22).
    with open(os.path.join(work, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "harm')
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("is not a complete metrics record") == 1, again.stderr[-3000:]
    assert _metric_steps(work) == [1, 2, 3]


@pytest.mark.slow
def test_two_eval_processes_on_one_out_dir(tmp_path):
    server = FakeJudgeServer(lambda prompt, hit: ("sleep", 0.15, "I cannot help with that."))
    out = str(tmp_path / "eval")
    from advgame_jax.data import packaged_seed_path

    args = [
        PY,
        os.path.join(REPO, "launch", "eval.py"),
        f"--endpoint={server.url}",
        "--endpoint_model=judge",
        f"--out_dir={out}",
        "--batch_size=1",
        f"--set=toy=seeds:{packaged_seed_path('toy_valid.jsonl')}",
        "--num_resamples=50",
    ]
    with server:
        first = subprocess.Popen(
            args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            _wait_for_holder(out, first, timeout=120)
            t0 = time.monotonic()
            second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
            took = time.monotonic() - t0
            assert second.returncode != 0
            assert f"in use by pid {first.pid} on" in second.stderr, second.stderr[-2000:]
            assert took < 60, took
            first.communicate(timeout=300)
            assert first.returncode == 0
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    with open(os.path.join(out, "results.jsonl"), encoding="utf-8") as f:
        uids = [json.loads(line)["uid"] for line in f]
    assert len(uids) == 32 and len(set(uids)) == 32  # each example once
    with open(os.path.join(out, "eval.json"), encoding="utf-8") as f:
        assert json.load(f)["sets"]["toy"]["num_examples"] == 32
