"""Benchmark: naive vs chunked per-token log-probs (time and compiled memory), CPU or GPU.

For hidden ``[N, d]``, unembedding ``[d, V]`` and targets ``[N]`` it reports, jit-compiled and
warm, the median over ``--repeats`` runs of forward and forward+backward for the naive
(materialised logits) and chunked (``advgame_jax.ops.token_logprobs``) versions, the compiled
temporary memory of each (``memory_analysis().temp_size_in_bytes``), the chunked/naive ratios,
and the matmul-rate baseline: one ``[N, d] x [d, V]`` matmul timed in the same process, and the
"four matmuls" floor (forward + recompute + two gradient matmuls) that the GPU target in
ARCHITECTURE.md is stated against.

    python benchmarks/loss_kernels.py --n 4096 --d 256 --v 32000 --chunk 1024 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from advgame_jax.ops.logprobs import (
    VOCAB_CHUNK_SIZE,
    naive_token_logprobs,
    tiled_token_logprobs_and_entropy,
)


def _compile(fn, args):
    """Compile once; the executable is both timed and asked for its memory analysis."""
    return fn.lower(*args).compile()


def _median_seconds(compiled, args, repeats):
    jax.block_until_ready(compiled(*args))  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _memory(compiled):
    """(temp, argument, output) bytes of a compiled function; None where not reported."""
    try:
        analysis = compiled.memory_analysis()
    except Exception as err:  # some backends raise instead of returning None
        print(f"  memory_analysis unavailable: {err}", file=sys.stderr)
        return None, None, None
    if analysis is None:
        return None, None, None
    return (
        getattr(analysis, "temp_size_in_bytes", None),
        getattr(analysis, "argument_size_in_bytes", None),
        getattr(analysis, "output_size_in_bytes", None),
    )


def _gib(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.3f} GiB"


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _fmt_ratio(r):
    return "n/a" if r is None else f"{r:.3f}"


def _value_and_grad(fn):
    def loss(h, w, t, g):
        return jnp.sum(g * fn(h, w, t))

    return jax.value_and_grad(loss, argnums=(0, 1))


def _chunked(chunk, vocab_chunk):
    """``token_logprobs`` with both tile sizes chosen (the public function uses
    ``chunk_size`` and ``VOCAB_CHUNK_SIZE``)."""

    def chunked(h, w, t):
        return tiled_token_logprobs_and_entropy(
            h, w, t, chunk_size=chunk, vocab_chunk_size=vocab_chunk, with_entropy=False
        )[0]

    return chunked


def make_functions(chunk, vocab_chunk):
    """The four jitted functions under test: naive/chunked, value and value+grad."""
    chunked = _chunked(chunk, vocab_chunk)
    return {
        "naive_fwd": jax.jit(naive_token_logprobs),
        "chunked_fwd": jax.jit(chunked),
        "naive_fwd_bwd": jax.jit(_value_and_grad(naive_token_logprobs)),
        "chunked_fwd_bwd": jax.jit(_value_and_grad(chunked)),
    }


def _inputs(n, d, v, dtype, seed):
    dt = jnp.dtype(dtype)
    k_h, k_w, k_t, k_g = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k_h, (n, d), jnp.float32).astype(dt)
    w = (jax.random.normal(k_w, (d, v), jnp.float32) / d**0.5).astype(dt)
    t = jax.random.randint(k_t, (n,), 0, v, jnp.int32)
    g = jax.random.normal(k_g, (n,), jnp.float32)
    return h, w, t, g


def sweep(n, d, v, tiles, dtype, repeats, seed=0):
    """Chunked forward and forward+backward for several (rows, vocab) tile sizes."""
    h, w, t, g = _inputs(n, d, v, dtype, seed)
    out = []
    for chunk, vocab_chunk in tiles:
        fwd = _compile(jax.jit(_chunked(chunk, vocab_chunk)), (h, w, t))
        fwd_bwd = _compile(jax.jit(_value_and_grad(_chunked(chunk, vocab_chunk))), (h, w, t, g))
        row = {"chunk": chunk, "vocab_chunk": vocab_chunk}
        row["fwd_s"] = _median_seconds(fwd, (h, w, t), repeats)
        row["fwd_temp_bytes"] = _memory(fwd)[0]
        row["fwd_bwd_s"] = _median_seconds(fwd_bwd, (h, w, t, g), repeats)
        row["fwd_bwd_temp_bytes"] = _memory(fwd_bwd)[0]
        print(
            f"tile {chunk:6d} x {vocab_chunk:6d}: fwd {row['fwd_s'] * 1e3:9.2f} ms "
            f"(temp {_gib(row['fwd_temp_bytes'])}), fwd+bwd {row['fwd_bwd_s'] * 1e3:9.2f} ms "
            f"(temp {_gib(row['fwd_bwd_temp_bytes'])})",
            flush=True,
        )
        out.append(row)
    return out


def run(n, d, v, chunk, vocab_chunk, dtype, repeats, seed=0):
    """Measure everything; returns a dict of results (seconds, bytes, ratios)."""
    h, w, t, g = _inputs(n, d, v, dtype, seed)
    dt = h.dtype
    fns = make_functions(chunk, vocab_chunk)
    res = {
        "n": n,
        "d": d,
        "v": v,
        "chunk": chunk,
        "vocab_chunk": vocab_chunk,
        "dtype": str(dt),
        "repeats": repeats,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "jax_version": jax.__version__,
    }
    matmul = _compile(jax.jit(lambda a, b: jnp.dot(a, b)), (h, w))
    res["matmul_s"] = _median_seconds(matmul, (h, w), repeats)
    res["matmul_tflops"] = 2.0 * n * d * v / res["matmul_s"] / 1e12
    res["four_matmuls_s"] = 4.0 * res["matmul_s"]
    for name, fn in fns.items():
        args = (h, w, t) if name.endswith("fwd") else (h, w, t, g)
        compiled = _compile(fn, args)
        res[f"{name}_s"] = _median_seconds(compiled, args, repeats)
        temp, arg, out = _memory(compiled)
        res[f"{name}_temp_bytes"] = temp
        res[f"{name}_arg_bytes"] = arg
        res[f"{name}_out_bytes"] = out
    for kind in ("fwd", "fwd_bwd"):
        res[f"time_ratio_{kind}"] = _ratio(res[f"chunked_{kind}_s"], res[f"naive_{kind}_s"])
        res[f"temp_ratio_{kind}"] = _ratio(
            res[f"chunked_{kind}_temp_bytes"], res[f"naive_{kind}_temp_bytes"]
        )
    res["chunked_fwd_bwd_over_four_matmuls"] = res["chunked_fwd_bwd_s"] / res["four_matmuls_s"]
    res["naive_fwd_bwd_over_four_matmuls"] = res["naive_fwd_bwd_s"] / res["four_matmuls_s"]
    return res


def report(res):
    print(
        f"N={res['n']} d={res['d']} V={res['v']} chunk={res['chunk']} "
        f"vocab_chunk={res['vocab_chunk']} dtype={res['dtype']} "
        f"repeats={res['repeats']} | {res['device']} jax {res['jax_version']}"
    )
    print(
        f"matmul [N,d]x[d,V]: {res['matmul_s'] * 1e3:.2f} ms ({res['matmul_tflops']:.2f} TFLOP/s)"
        f"; four-matmul floor {res['four_matmuls_s'] * 1e3:.2f} ms"
    )
    print(f"{'':16s}{'median ms':>12s}{'temp':>14s}{'args':>14s}{'outputs':>14s}")
    for name in ("naive_fwd", "chunked_fwd", "naive_fwd_bwd", "chunked_fwd_bwd"):
        print(
            f"{name:16s}{res[name + '_s'] * 1e3:12.2f}{_gib(res[name + '_temp_bytes']):>14s}"
            f"{_gib(res[name + '_arg_bytes']):>14s}{_gib(res[name + '_out_bytes']):>14s}"
        )
    for kind in ("fwd", "fwd_bwd"):
        print(
            f"chunked/naive {kind}: time {_fmt_ratio(res['time_ratio_' + kind])}, "
            f"temp memory {_fmt_ratio(res['temp_ratio_' + kind])}"
        )
    print(
        "fwd+bwd / four matmuls: chunked "
        f"{res['chunked_fwd_bwd_over_four_matmuls']:.3f}, naive "
        f"{res['naive_fwd_bwd_over_four_matmuls']:.3f}"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="tokens (rows of hidden)")
    p.add_argument("--d", type=int, default=256, help="hidden size")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size")
    p.add_argument("--chunk", type=int, default=1024, help="rows per tile (chunk_size)")
    p.add_argument(
        "--vocab-chunk", type=int, default=VOCAB_CHUNK_SIZE, help="vocabulary columns per tile"
    )
    p.add_argument(
        "--sweep",
        default="",
        help="also time the chunked kernel for these tiles, e.g. '1024x16384,4096x8192'",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    for field in ("n", "d", "v", "chunk", "vocab_chunk", "repeats"):
        if getattr(a, field) < 1:
            p.error(f"--{field.replace('_', '-')} must be a positive integer")
    try:
        tiles = [tuple(int(x) for x in item.split("x")) for item in a.sweep.split(",") if item]
    except ValueError:
        p.error(f"--sweep must look like '1024x16384,4096x8192', got {a.sweep!r}")
    if any(len(tile) != 2 or min(tile) < 1 for tile in tiles):
        p.error(f"--sweep tiles must be ROWSxCOLUMNS with positive sizes, got {a.sweep!r}")
    res = run(a.n, a.d, a.v, a.chunk, a.vocab_chunk, a.dtype, a.repeats)
    report(res)
    if tiles:
        print("chunked kernel by tile (rows x vocabulary columns):", flush=True)
        res["sweep"] = sweep(a.n, a.d, a.v, tiles, a.dtype, a.repeats)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
