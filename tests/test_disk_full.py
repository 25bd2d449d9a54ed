"""A full disk during a training run (issue 17 item 21): one ``error:`` line that says "no
space left on device", exit status 2, no traceback on the console (Orbax's and ours go to
train.log). The disk fills up inside Orbax's background write (ENOSPC raised by its JSON
writer), as it does on a real full disk."""

import logging
import os
import subprocess
import sys

import pytest

from advgame_jax.experiment.logsetup import FILE_ONLY, ConsoleFilter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRAPPER = """
import errno, runpy, sys
import orbax.checkpoint as ocp

async def disk_full(self, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")

ocp.JsonCheckpointHandler._save_fn = disk_full
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _record(pathname, level=logging.WARNING, exc=False, **extra):
    r = logging.LogRecord(
        "x", level, pathname, 1, "msg", None, (ValueError, ValueError("x"), None) if exc else None
    )
    r.__dict__.update(extra)
    return r


def test_console_filter_keeps_orbax_and_tracebacks_off_the_console():
    f = ConsoleFilter()
    orbax = os.path.join("site-packages", "orbax", "checkpoint", "x.py")
    assert not f.filter(_record(orbax, logging.WARNING))  # e.g. _CHECKPOINT_METADATA missing
    assert not f.filter(_record(orbax, logging.ERROR, exc=True))
    assert not f.filter(_record(os.path.join("site-packages", "jax", "x.py"), logging.INFO))
    assert f.filter(_record(os.path.join("site-packages", "jax", "x.py"), logging.WARNING))
    own = os.path.join(REPO, "advgame_jax", "training", "checkpoint.py")
    assert f.filter(_record(own, logging.INFO))
    assert not f.filter(_record(own, logging.ERROR, exc=True, **FILE_ONLY))


@pytest.mark.slow
def test_full_disk_is_one_error_line(tmp_path, toy_dir):
    work = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            WRAPPER,
            os.path.join(REPO, "launch", "train.py"),
            "--config=configs/tiny.py",
            f"--config.workdir={work}",
            f"--config.toy_dir={toy_dir}",
            "--config.train.num_steps=1",
            "--config.train.checkpoint_every=1",
            "--config.train.validate_every=0",
            "--config.logging.progress_bar=False",
            "--config.logging.tensorboard=False",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) < 20, proc.stderr
    log = (work / "train.log").read_text()
    assert "Traceback" in log and "No space left on device" in log
