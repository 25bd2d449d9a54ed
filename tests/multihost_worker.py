"""One process of the multi-host tests (run as ``python -m tests.multihost_worker``).

Joins the world described by ADVGAME_* variables (or none), builds an FSDP mesh over every
device of every process, plays this process's share of fixed preference pairs through
``collate_global`` and three DPO updates, and process 0 writes the final params (all
gathered) to ``--out``. With ``--ckpt`` it also saves the state with Orbax (collectively) or,
with ``--restore``, restores it onto this world's mesh and writes those params instead.
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_devices", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--counts", default="5,2", help="pairs per process (the global layout)")
    ap.add_argument(
        "--as_single",
        action="store_true",
        help="one process holding every process's rows in the same layout",
    )
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--restore", action="store_true")
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"

    from advgame_jax import distributed

    world = distributed.detect_world()
    distributed.initialize(world)
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    import dataclasses

    from advgame_jax.training import init_player_state, make_update_step
    from advgame_jax.training.batching import collate_pairs
    from advgame_jax.training.multihost import (
        collate_global,
        global_to_host,
        host_to_global,
        plan_global,
    )
    from advgame_jax.training.sharding import state_shardings
    from tests import test_training_support as sup

    n = jax.device_count()
    mesh = distributed.build_mesh({"fsdp": -1}, {"fsdp": jax.process_count()})
    counts = [int(c) for c in args.counts.split(",")]
    per_process = [sup.fixed_pairs(c, seed=10 + i) for i, c in enumerate(counts)]
    from advgame_jax.training.update import LossSettings, StepSettings

    step = make_update_step(
        sup.CFG,
        sup.optimizer(),
        LossSettings(kind="dpo", beta=0.1),
        StepSettings(compute_dtype=jax.numpy.float32, chunk_size=64, remat=False),
        mesh=mesh,
    )
    state = init_player_state(sup.init(0), sup.optimizer(), reference="ema")
    host_state = jax.tree.map(np.asarray, state)
    shardings = state_shardings(host_state, sup.CFG, mesh)

    if args.restore:
        from advgame_jax.training.checkpoint import GameCheckpointer

        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), host_state, shardings
        )
        ck = GameCheckpointer(args.ckpt, save_every=1, keep=2, async_save=False)
        _, restored, _ = ck.restore({"defender": abstract})
        params = global_to_host(restored["defender"].params)
    else:
        state = host_to_global(host_state, shardings)
        total = sum(counts)
        if args.as_single:
            # The same global rows a 2-process run assembles, collated by one process.
            local_rows, t = plan_global(
                np.asarray(counts),
                max(
                    len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                    for ps in per_process
                    for p in ps
                ),
                num_processes=len(counts),
                multiple=n,
            )
            parts = [
                collate_pairs(
                    [dataclasses.replace(p, weight=1.0 / total) for p in ps],
                    pad_id=sup.PAD,
                    pair_buckets=(local_rows,),
                    length_buckets=(t,),
                    data_parallel_size=n // len(counts),
                )
                for ps in per_process
            ]
            batch = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
        else:
            batch = collate_global(
                per_process[jax.process_index()], kind="pairs", pad_id=sup.PAD, mesh=mesh
            )
        for _ in range(3):
            state, metrics = step(state, batch)
        if args.ckpt:
            from advgame_jax.training.checkpoint import GameCheckpointer

            ck = GameCheckpointer(args.ckpt, save_every=1, keep=2, async_save=False)
            ck.save(3, {"defender": state}, {"process_count": jax.process_count()})
            ck.wait()
        params = global_to_host(state.params)
        print(f"process {jax.process_index()}: num_pairs={float(metrics['num_pairs'])}", flush=True)
    if jax.process_index() == 0:
        flat = {str(i): v for i, v in enumerate(jax.tree.leaves(params))}
        np.savez(args.out, **flat)
    print(f"process {jax.process_index()} of {jax.process_count()}: done ({n} devices)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
