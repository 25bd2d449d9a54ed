"""Private, append-only result files: JSONL records (mode 0600) that a killed run resumes.

``ResultsFile(path)`` reads the complete records already there (a torn last line, left by a
kill in the middle of a write, is cut off — the file is ours), then ``append(records)``
writes whole lines, flushed and fsynced, so every record on disk is a finished example.
``write_private_json`` / ``write_text_atomic`` build a file aside and rename it into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable

from advgame_jax.errors import UserError


class ResultsFileError(UserError, ValueError):
    """A results file that is not ours or holds a malformed complete line."""


class RunMismatchError(UserError, ValueError):
    """``out_dir`` holds results of a run with other settings."""


def check_run_identity(out_dir: str, identity: dict) -> None:
    """Record what a run's results are produced with (``run.json``), or refuse a directory
    whose results came from other settings, so one results file never mixes runs."""
    identity = json.loads(json.dumps(identity))
    path = os.path.join(out_dir, "run.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != identity:
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise RunMismatchError(
                f"{out_dir} holds results of a run with other settings "
                f"(differs in {diff}); use another --out_dir"
            )
    else:
        write_json_atomic(path, identity)


def _open_private(path: str, flags: int) -> int:
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


class ResultsFile:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.records: list[dict] = []
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            for n, line in enumerate(complete.decode("utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise ResultsFileError(
                        f"{self.path}:{n}: not a JSON record; move the file "
                        f"away or choose another --out_dir"
                    ) from None
                self.records.append(rec)
            if len(complete) != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(len(complete))
        self._fd = _open_private(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        if not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        if self._fd is None:
            raise ValueError(f"{self.path}: append after close")
        os.write(self._fd, data)
        os.fsync(self._fd)
        self.records.extend(records)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_text_atomic(path: str, text: str, *, mode: int = 0o644) -> str:
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)  # our own temporary file
        raise
    return path


def write_json_atomic(path: str, obj, *, mode: int = 0o644) -> str:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode=mode)
