"""Ownership markers, atomic builds and writes: the project never deletes a user's files."""

import os
import stat

import pytest

from advgame_jax import fsutil


def _user_folder(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.txt").write_text("precious")
    return str(d)


def test_remove_owned_refuses_a_user_folder(tmp_path):
    d = _user_folder(tmp_path)
    with pytest.raises(fsutil.NotOwnedError, match="mine"):
        fsutil.remove_owned(d, "toy_world")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def test_remove_owned_refuses_other_kind_and_links(tmp_path):
    d = fsutil.make_owned_dir(str(tmp_path / "a"), "sync")
    with pytest.raises(fsutil.NotOwnedError):
        fsutil.remove_owned(d, "toy_world")
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(fsutil.NotOwnedError):
        fsutil.remove_owned(str(link), "sync")
    assert os.path.isdir(d)
    assert fsutil.remove_owned(d, "sync") is True
    assert not os.path.exists(d)
    assert fsutil.remove_owned(d, "sync") is False


def test_make_owned_dir_refuses_existing_user_folder(tmp_path):
    d = _user_folder(tmp_path)
    with pytest.raises(fsutil.NotOwnedError):
        fsutil.make_owned_dir(d, "sync")


def test_build_dir_atomically_replaces_only_owned(tmp_path):
    final = str(tmp_path / "world")

    def build(content):
        def fn(tmp):
            with open(os.path.join(tmp, "f.txt"), "w") as f:
                f.write(content)

        return fn

    fsutil.build_dir_atomically(final, "toy_world", build("v1"))
    assert open(os.path.join(final, "f.txt")).read() == "v1"
    fsutil.build_dir_atomically(final, "toy_world", build("v2"))
    assert open(os.path.join(final, "f.txt")).read() == "v2"
    assert sorted(os.listdir(tmp_path)) == ["world"]  # no tmp/old siblings left

    user = _user_folder(tmp_path)
    called = []
    with pytest.raises(fsutil.NotOwnedError):
        fsutil.build_dir_atomically(user, "toy_world", lambda tmp: called.append(tmp))
    assert called == []  # refused before any work
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def test_failed_build_keeps_previous_artefact(tmp_path):
    final = str(tmp_path / "world")
    fsutil.build_dir_atomically(
        final, "toy_world", lambda tmp: open(os.path.join(tmp, "f.txt"), "w").write("v1")
    )

    def boom(tmp):
        open(os.path.join(tmp, "f.txt"), "w").write("half")
        raise MemoryError("out of memory in the build")

    with pytest.raises(MemoryError):
        fsutil.build_dir_atomically(final, "toy_world", boom)
    assert open(os.path.join(final, "f.txt")).read() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["world"]


def test_stale_build_siblings_removed_only_when_owned(tmp_path):
    final = str(tmp_path / "world")
    stale = fsutil.make_owned_dir(final + ".tmp-deadbeef", "toy_world")
    foreign = tmp_path / "world.tmp-user"
    foreign.mkdir()
    assert fsutil.remove_stale_builds(final, "toy_world") == 1
    assert not os.path.exists(stale) and foreign.is_dir()


def test_atomic_write_mode_and_no_torn_file(tmp_path):
    p = str(tmp_path / "log.jsonl")
    fsutil.atomic_write_text(p, "a\n", mode=0o600)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    fsutil.atomic_write_text(p, "b\n", mode=0o600)
    assert open(p).read() == "b\n"
    assert os.listdir(tmp_path) == ["log.jsonl"]


def test_check_writable_dir_under_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(OSError, match="train.workdir"):
        fsutil.check_writable_dir(str(f / "run"), "train.workdir")
