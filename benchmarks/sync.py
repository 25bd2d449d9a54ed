"""Sync cost: write a sampling-params sync checkpoint (``sampling.weight_sync``) and load it
into an engine, timed, in GB/s.

    python benchmarks/sync.py --gb=1                # write + engine-side read (no vLLM)
    python benchmarks/sync.py --gb=0.5 --vllm       # + a real vllm engine process's 'load'

A Llama-shaped model whose bf16 params total about ``--gb`` GB (width ``--hidden``, layers
added until the size is reached) is made in JAX. Timed, each ``--repeats`` times (median):

* write: ``write_sync_checkpoint`` (cast to the engine dtype shard by shard, Orbax write,
  commit marker, rename) into ``--dir`` (default: a temp dir; point it at the disk engines
  will read from, e.g. node-local NVMe);
* read: what each engine worker does in ``OrbaxWeightLoader`` before vLLM's own weight
  processing: restore to host numpy and convert every tensor to torch under its HF name;
* with ``--vllm``: an offloaded engine (vLLM's own server, ``sampling.engines``) is started
  on the model and the trainer-side refresh is timed end to end over HTTP (pause, every
  worker's read + vLLM's layer-wise reload, reset prefix cache, version label, resume; CPU
  backend here).

GB/s = checkpoint bytes / median seconds. The implied time of a sync of a model of ``P``
bytes is ``P / write_GBps + P / load_GBps`` (write, then every engine loads in parallel);
docs/sampling.md applies it to 2 x 8B bf16.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="approximate bf16 checkpoint size")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default="", help="where to write (default: a temp dir)")
    p.add_argument("--vllm", action="store_true", help="also time a vLLM engine's load")
    return p.parse_args()


def _config(a):
    from advgame_jax.models import ModelConfig

    d, v = a.hidden, a.vocab
    per_layer = 4 * d * d + 3 * d * 4 * d + 2 * d  # q,k,v,o (full heads) + MLP + norms
    layers = max(1, round((a.gb * 1e9 / 2 - 2 * v * d) / per_layer))
    return ModelConfig(
        model_type="llama",
        vocab_size=v,
        hidden_size=d,
        intermediate_size=4 * d,
        num_layers=layers,
        num_heads=d // 64,
        num_kv_heads=d // 64,
        head_dim=64,
        max_position_embeddings=512,
    )


def _median(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    a = _args()
    import jax
    import jax.numpy as jnp

    from advgame_jax.models import init_params, save_hf
    from advgame_jax.sampling import weight_sync as ws

    config = _config(a)
    params = init_params(config, jax.random.key(0), jnp.float32)
    nbytes = sum(x.size for x in jax.tree.leaves(params)) * 2  # as bf16
    root_parent = a.dir or tempfile.mkdtemp(prefix="advgame_sync_bench_")
    root = os.path.join(root_parent, "sync", "defender")
    version = iter(range(1, 10**6))
    last = {}

    def write():
        last["path"] = ws.write_sync_checkpoint(
            root, params, version=next(version), role="defender", dtype=jnp.bfloat16
        )

    def read():
        _, restored = ws.read_sync_checkpoint(last["path"])
        for _ in ws.hf_tensors(config, restored):
            pass

    write()  # warm-up: jit of the cast, Orbax start-up
    t_write, w_times = _median(write, a.repeats)
    read()
    t_read, r_times = _median(read, a.repeats)
    result = {
        "checkpoint_gb": round(nbytes / 1e9, 3),
        "layers": config.num_layers,
        "write_s": round(t_write, 3),
        "write_gbps": round(nbytes / 1e9 / t_write, 3),
        "read_s": round(t_read, 3),
        "read_gbps": round(nbytes / 1e9 / t_read, 3),
        "write_times_s": w_times,
        "read_times_s": r_times,
        "dir": root_parent,
    }
    if a.vllm:
        from advgame_jax.sampling.base import SyncCheckpoint
        from advgame_jax.sampling.engines import EngineClient, EngineSpec, RemoteSampler

        hf_dir = os.path.join(root_parent, "hf")
        save_hf(hf_dir, config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
        client = EngineClient.spawn(
            EngineSpec(
                role="defender",
                hf_dir=hf_dir,
                dtype="bfloat16",
                max_model_len=256,
                kv_cache_bytes=64 << 20,
                enforce_eager=True,
            ),
            os.path.join(root_parent, "engines"),
        )
        try:
            sampler = RemoteSampler(client, config)
            sampler.load_weights(SyncCheckpoint(last["path"]))  # warm-up
            t_load, l_times = _median(
                lambda: sampler.load_weights(SyncCheckpoint(last["path"])), a.repeats
            )
        finally:
            client.close()
        result.update(
            engine_load_s=round(t_load, 3),
            engine_load_gbps=round(nbytes / 1e9 / t_load, 3),
            engine_load_times_s=l_times,
        )
    print(
        f"sync checkpoint {nbytes / 1e9:.2f} GB (bf16): write {result['write_gbps']:.2f} GB/s, "
        f"engine-side read {result['read_gbps']:.2f} GB/s"
        + (f", vLLM engine load {result['engine_load_gbps']:.2f} GB/s" if a.vllm else "")
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
