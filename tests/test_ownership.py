"""Files and directories the project did not write are never rewritten, moved or quarantined
(issue 17 items 3, 4): ``metrics.jsonl`` is recorded as the project's when created and only
its last line may be repaired as torn; the checkpoints directory refuses step directories the
project did not write. Checkpoint steps hold the attacker: modes 0700/0600 under umask 022,
and their checksums are computed off the training thread (item 26)."""

import json
import os
import threading
import zlib

import pytest

from advgame_jax import fsutil
from advgame_jax.experiment.metrics import MetricsFileError, MetricsWriter, truncate_metrics
from advgame_jax.training import GameCheckpointer, checkpoint_files
from tests.test_checkpoint_faults import CONFIG, _abstract, _state


def _write_run(workdir, steps):
    w = MetricsWriter(str(workdir), total_steps=9, tensorboard=False, progress_bar=False)
    for s in steps:
        w.write(s, {"loss": float(s)})
    w.close()


def test_user_metrics_file_is_refused_untouched(tmp_path):
    path = tmp_path / "metrics.jsonl"
    user = b'{"step": 1, "mine": 1}\nnot json at all\n{"step": 9}\n'
    path.write_bytes(user)
    with pytest.raises(fsutil.NotOwnedError, match="not written by advgame_jax"):
        truncate_metrics(str(path), 0)
    with pytest.raises(fsutil.NotOwnedError):
        MetricsWriter(str(tmp_path), total_steps=3, tensorboard=False, progress_bar=False)
    assert path.read_bytes() == user


def test_only_the_last_line_may_be_torn(tmp_path, caplog):
    _write_run(tmp_path, [1, 2, 3])
    path = tmp_path / "metrics.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"step": 4, "lo')
    with caplog.at_level("WARNING"):
        assert truncate_metrics(str(path), 2) == 1
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert sum("not a complete metrics record" in r.getMessage() for r in caplog.records) == 1
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"

    # a bad line in the middle is not a torn write: refused, nothing changed
    _write_run(tmp_path / "b", [1, 2, 3])
    p2 = tmp_path / "b" / "metrics.jsonl"
    lines = p2.read_bytes().split(b"\n")
    lines[1] = b"edited by hand"
    p2.write_bytes(b"\n".join(lines))
    before = p2.read_bytes()
    with pytest.raises(MetricsFileError, match=r"metrics\.jsonl:2: not a metrics record"):
        truncate_metrics(str(p2), 3)
    assert p2.read_bytes() == before


def test_user_step_directories_are_refused_not_moved(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "0").mkdir(parents=True)
    (root / "1").mkdir()
    (root / "1" / "notes.txt").write_text("mine")
    with pytest.raises(
        fsutil.NotOwnedError, match=r"checkpoints/0' was not written by advgame_jax"
    ):
        GameCheckpointer(root, save_every=1, keep=2)
    assert sorted(os.listdir(root)) == ["0", "1"]  # nothing moved, no quarantine
    assert (root / "1" / "notes.txt").read_text() == "mine"

    # a user directory dropped into the project's own checkpoints dir: refused as well
    d = tmp_path / "ours"
    with GameCheckpointer(d, save_every=1, keep=3) as ckpt:
        ckpt.save(1, _state(0), {"config": CONFIG})
    (d / "2").mkdir()
    with pytest.raises(fsutil.NotOwnedError, match=r"ours/2' was not written"):
        GameCheckpointer(d, save_every=1, keep=3)
    assert (d / "2").is_dir() and not (d / "quarantine").exists()
    os.rmdir(d / "2")
    with GameCheckpointer(d, save_every=1, keep=3) as ckpt:  # the project's own: resumes
        assert ckpt.restore(_abstract(_state(0)))[0] == 1


def test_checkpoint_modes_under_umask_022_and_checksums_off_thread(tmp_path, monkeypatch):
    old = os.umask(0o022)
    readers = []
    real = checkpoint_files._crc32

    def spy(path):
        readers.append(threading.current_thread().name)
        return real(path)

    monkeypatch.setattr(checkpoint_files, "_crc32", spy)
    try:
        d = tmp_path / "ckpt"
        with GameCheckpointer(d, save_every=1, keep=3) as ckpt:
            ckpt.save(1, _state(0), {"config": CONFIG})
            ckpt.save(2, _state(1), {"config": CONFIG})
    finally:
        os.umask(old)
    assert readers and all(n.startswith("advgame-manifest") for n in readers), set(readers)
    assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    for step in ("1", "2"):
        for root, _dirs, files in os.walk(d / step):
            assert oct(os.stat(root).st_mode & 0o777) == "0o700", root
            for f in files:
                assert oct(os.stat(os.path.join(root, f)).st_mode & 0o777) == "0o600", f
        with open(d / step / checkpoint_files.MANIFEST) as f:
            man = json.load(f)
        assert man["created_by"] == "advgame_jax"
        for rel, entry in man["files"].items():  # the checksums are those of the files
            with open(d / step / rel, "rb") as f:
                assert zlib.crc32(f.read()) == entry["crc32"], rel
