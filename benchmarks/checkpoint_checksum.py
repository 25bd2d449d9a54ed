"""Cost of checkpoint checksums (crc32 per file) and whether they stall the training thread.

    PYTHONPATH=. python benchmarks/checkpoint_checksum.py --params 1e9 --steps 12 --json out.json

A state of ``--params`` float32 parameters (a list of 64 Mi-element arrays on the default JAX
device) is saved by ``training.checkpoint.GameCheckpointer`` (async Orbax save, then the
manifest with crc32 on the manifest thread) while a "training step" (a jitted matmul chain of
fixed cost) runs on the main thread; ``poll()`` runs after every step, as in the loop. For
checksums off and on it reports: the median step time of the steps while a save and its
manifest are in flight and of quiet steps, the time the training thread spends in ``save()``
and ``poll()``, and the time until the step's manifest is written. It also measures crc32
throughput (in memory, and re-reading the committed files) and, as the baseline, what the
previous design cost the training thread: ``write_manifest(checksums=True)`` run inline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from advgame_jax.training.checkpoint import GameCheckpointer, write_manifest

CHUNK = 64 * 2**20  # elements per array


def make_state(n_params: int):
    """Random float32 leaves (incompressible, like trained weights)."""
    leaves, left, rng = [], n_params, np.random.default_rng(0)
    while left > 0:
        n = min(CHUNK, left)
        leaves.append(jax.device_put(rng.standard_normal(n, dtype=np.float32)))
        left -= n
    return {"w": leaves}


def crc_throughput(nbytes: int = 512 * 2**20) -> float:
    buf = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    zlib.crc32(buf)
    return nbytes / (time.perf_counter() - t0) / 2**30


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def run(state, checksums: bool, steps: int, save_at: int, root: str, step_fn, x) -> dict:
    d = os.path.join(root, f"ckpt-{int(checksums)}")
    ckpt = GameCheckpointer(d, save_every=10**9, keep=1, checksums=checksums)
    step_times, in_flight, blocked = [], [], 0.0
    manifest_at = None
    t_save = None
    for s in range(1, steps + 1):
        t0 = time.perf_counter()
        y = step_fn(x)
        y.block_until_ready()
        tb = time.perf_counter()
        ckpt.poll()
        if s == save_at:
            t_save = time.perf_counter()
            ckpt.save(s, state, {"config": {}}, force=True)
        blocked += time.perf_counter() - tb
        dt = time.perf_counter() - t0
        step_times.append(dt)
        busy = t_save is not None and manifest_at is None
        if busy:
            in_flight.append(dt)
            man = os.path.join(d, str(save_at), "advgame_manifest.json")
            if os.path.exists(man):
                manifest_at = time.perf_counter() - t_save
    tc = time.perf_counter()
    ckpt.close()
    close_s = time.perf_counter() - tc
    if manifest_at is None:
        manifest_at = time.perf_counter() - t_save
    quiet = [t for t in step_times[1:] if t not in in_flight]
    out = {
        "checksums": checksums,
        "median_step_s_in_flight": statistics.median(in_flight),
        "median_step_s_quiet": statistics.median(quiet) if quiet else None,
        "train_thread_in_save_and_poll_s": blocked,
        "close_s": close_s,
        "save_to_manifest_s": manifest_at,
        "bytes": dir_bytes(os.path.join(d, str(save_at))),
        "steps_in_flight": len(in_flight),
    }
    if checksums:  # the previous design: the whole step re-read on the training thread
        t0 = time.perf_counter()
        write_manifest(os.path.join(d, str(save_at)), checksums=True)
        out["inline_crc_manifest_s"] = time.perf_counter() - t0
    shutil.rmtree(d)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save_at", type=int, default=3)
    ap.add_argument("--dir", default="")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    root = a.dir or tempfile.mkdtemp(prefix="ckpt-bench-")
    state = make_state(int(a.params))
    jax.block_until_ready(state)
    x = jnp.ones((768, 768), jnp.float32)
    step_fn = jax.jit(lambda v: jnp.tanh(v @ v @ v @ v).sum())
    step_fn(x).block_until_ready()
    res = {
        "params": int(a.params),
        "state_gib": int(a.params) * 4 / 2**30,
        "crc32_gib_per_s_memory": crc_throughput(),
        "runs": [],
    }
    for checksums in (False, True, False, True):
        res["runs"].append(run(state, checksums, a.steps, a.save_at, root, step_fn, x))
        print(json.dumps(res["runs"][-1]), flush=True)
    on = [r for r in res["runs"] if r["checksums"]]
    off = [r for r in res["runs"] if not r["checksums"]]
    gib = on[0]["bytes"] / 2**30
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    res["summary"] = {
        "checkpoint_gib": gib,
        "crc_reread_s_per_gib": med(on, "inline_crc_manifest_s") / gib,
        "step_in_flight_ratio_on_vs_off": med(on, "median_step_s_in_flight")
        / med(off, "median_step_s_in_flight"),
        "train_thread_blocked_s_on": med(on, "train_thread_in_save_and_poll_s"),
        "train_thread_blocked_s_off": med(off, "train_thread_in_save_and_poll_s"),
        "save_to_manifest_s_on": med(on, "save_to_manifest_s"),
        "save_to_manifest_s_off": med(off, "save_to_manifest_s"),
        "inline_crc_manifest_s": med(on, "inline_crc_manifest_s"),
        "median_step_s_quiet": med(off + on, "median_step_s_quiet"),
    }
    print(json.dumps(res["summary"], indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if not a.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
