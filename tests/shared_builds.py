"""Expensive read-only test artefacts built once per test run, shared by all test workers.

``pytest -n 2`` starts two worker processes; a session fixture or a module-level memo is built
once per worker. The artefacts here (the toy world, the tiny training run of
``tests/eval_world.py``) are built by whichever worker asks first, under a lock file in the
run's shared temporary directory; the other worker waits on the lock, then reuses the result.
Each build is keyed by name and lives only as long as the run's temporary directory, so every
run tests artefacts built by its own code.

Tests only read these artefacts. To catch a test that writes into one (which could break the
other worker), a fingerprint (every file's path, size and mtime) is taken after the build and
compared when the worker's session ends (:func:`check_unchanged`, called from conftest).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil

_FINGERPRINTS: dict[str, list] = {}


def run_root(tmp_path_factory) -> str:
    """The temporary directory shared by all workers of this test run (the base temp itself
    when not under xdist, so nothing leaks between runs)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = os.path.join(str(root), "shared_builds")
    os.makedirs(path, exist_ok=True)
    return path


def fingerprint(path: str) -> list:
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out.append([os.path.relpath(p, path), st.st_size, st.st_mtime_ns])
    return out


def shared(tmp_path_factory, name: str, build) -> str:
    """The directory ``<run root>/<name>``, filled once per run by ``build(path)``.

    ``build`` fills the final path itself (artefacts such as a training run record their own
    location); a ``.done.json`` file written after it succeeded marks it complete, and a failed
    build is removed so that the next caller tries again. Returns the path."""
    root = run_root(tmp_path_factory)
    final = os.path.join(root, name)
    done = final + ".done.json"
    with open(final + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not os.path.exists(done):
            shutil.rmtree(final, ignore_errors=True)  # a failed earlier try in this run
            os.makedirs(final)
            try:
                build(final)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
            with open(done + ".tmp", "w", encoding="utf-8") as f:
                json.dump(fingerprint(final), f)
            os.rename(done + ".tmp", done)
        with open(done, encoding="utf-8") as f:
            _FINGERPRINTS[final] = json.load(f)
    return final


def check_unchanged() -> list[str]:
    """Names of shared artefacts whose files changed since they were built (should be none)."""
    return [path for path, fp in _FINGERPRINTS.items() if fingerprint(path) != fp]


def toy_world(tmp_path_factory) -> str:
    """The toy world of ``configs/tiny.py`` (seed 0, its warm-up steps), as ``GameRunner``
    builds it for that config (same seeds, same order, same settings stamp)."""

    def build(path: str) -> None:
        import importlib

        from advgame_jax import game
        from advgame_jax.data import packaged_seed_path, read_seeds_jsonl
        from advgame_jax.experiment.toy_world import build_toy_world

        c = importlib.import_module("configs.tiny").get_config()
        templates = game.get_template_set(c.game.templates)
        build_toy_world(
            os.path.join(path, "toy"),
            seed=0,
            train_seeds=read_seeds_jsonl(packaged_seed_path("toy_seeds.jsonl")),
            attacker_prompt_text=lambda s: templates.attacker_prompt(
                s.prompt, s.category, c.game.attacker_format
            ),
            warmup_steps=c.toy_warmup_steps,
        )

    return os.path.join(shared(tmp_path_factory, "toy_world", build), "toy")
