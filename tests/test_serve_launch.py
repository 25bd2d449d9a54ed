"""launch/serve.py as a user runs it: the API key from a file (never on the command line), a
warning when bound beyond loopback without a key, one ``error:`` line for a --model_dir that
is not an HF export, graceful exit on SIGTERM; and the library no longer imports http.server."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from advgame_jax.sampling.servable import NotAnHFExportError, check_hf_export

REPO = pathlib.Path(__file__).resolve().parents[1]
SERVE = str(REPO / "launch" / "serve.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", ADVGAME_API_KEY="")


def _run(*args, env=ENV):
    return subprocess.run(
        [sys.executable, SERVE, *args], capture_output=True, text=True, timeout=120, env=env
    )


def _one_error_line(proc):
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


@pytest.fixture()
def layouts(tmp_path):
    """A training workdir, a checkpoint step dir and a half-made export."""
    work = tmp_path / "run"
    (work / "checkpoints" / "20" / "state").mkdir(parents=True)
    (work / "checkpoints" / "20" / "meta").mkdir()
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    return {
        "workdir": work,
        "checkpoints": work / "checkpoints",
        "step": work / "checkpoints" / "20",
        "half": half,
        "missing": tmp_path / "none",
    }


@pytest.mark.parametrize("kind", ["workdir", "checkpoints", "step", "half", "missing"])
def test_model_dir_that_is_not_an_hf_export(layouts, kind):
    with pytest.raises(NotAnHFExportError, match="expected an HF export.*launch/convert.py"):
        check_hf_export(str(layouts[kind]))


def test_launch_errors_are_one_line_and_warn_beyond_loopback(layouts):
    line = _one_error_line(_run(f"--model_dir={layouts['workdir']}"))
    assert "expected an HF export" in line and f"--checkpoint={layouts['workdir']}" in line
    # Beyond loopback without a key: a warning (before anything loads), then the error.
    proc = _run("--host=0.0.0.0", f"--model_dir={layouts['missing']}")
    assert re.search(r"serving on 0\.0\.0\.0 without an API key", proc.stderr), proc.stderr
    assert "does not exist" in _one_error_line(proc)
    line = _one_error_line(_run("--tiny_random", "--api_key=s3cret"))
    assert "ps" in line and "ADVGAME_API_KEY" in line and "s3cret" not in line
    assert "--queue_size=0" in _one_error_line(_run("--tiny_random", "--queue_size=0"))


@pytest.mark.slow
def test_api_key_from_a_file_and_graceful_sigterm(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k3y-from-file\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            SERVE,
            "--tiny_random",
            "--host=0.0.0.0",
            "--port=0",
            f"--api_key_file={key_file}",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        url, seen = None, []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"at (http://\S+:\d+)", line)
            url = m and m.group(1).replace("0.0.0.0", "127.0.0.1")
        assert url, "".join(seen)
        assert not any("without an API key" in ln for ln in seen)
        cmdline = pathlib.Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"k3y-from-file" not in cmdline
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        ok = httpx.get(
            url + "/v1/models", timeout=30, headers={"Authorization": "Bearer k3y-from-file"}
        )
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "advgame"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_library_does_not_import_http_server():
    pattern = re.compile(r"^\s*(import http\.server|from http\.server import)", re.M)
    hits = [
        str(p)
        for p in (REPO / "advgame_jax").rglob("*.py")
        if pattern.search(p.read_text(encoding="utf-8"))
    ]
    assert hits == []
