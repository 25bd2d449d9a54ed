"""Benchmark: the whole DPO/IPO update step (policy forward+backward on chosen and rejected,
reference forward, AdamW) with random weights at a given shape.

Reports the median step time over ``--steps`` warm steps, tokens/s, model FLOPs and MFU
(6·N·tokens for the policy, 2·N·tokens for the reference, plus causal attention: 4·L·T²·H·hd
per sequence forward, ×3 for the policy's forward+backward), peak device memory (GPU/TPU
``memory_stats``; the compiled temporaries on CPU), and, in the same process, the log-prob
kernel's forward+backward over the four-matmul floor at the step's token count.

Correctness is asserted at every size: the first step's loss is log 2 for DPO (θ̄ = θ, so
every margin is 0), the gradient norm is finite and positive, and the log-prob kernel agrees
with the materialised-logits reference on a slice.

    PYTHONPATH=. python benchmarks/train_step.py              # CPU size (seconds)
    PYTHONPATH=. python benchmarks/train_step.py --gpu        # Qwen2.5-1.5B, T=2048, bf16
    PYTHONPATH=. python benchmarks/train_step.py --gpu --model configs/models/qwen2.5_7b \\
        --fsdp 8 --pairs 64 --seq 4096

MFU needs the device's dense peak: ``--peak_tflops`` (default 989, an H200's bf16 dense).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from advgame_jax.models import ModelConfig, init_params, make_mesh
from advgame_jax.ops.logprobs import naive_token_logprobs, token_logprobs
from advgame_jax.training import collate_pairs, init_player_state, shard_state
from advgame_jax.training.optimizer import OptimizerSettings
from advgame_jax.training.update import LossSettings, StepSettings, UpdateSettings, update_step_from
from advgame_jax.types import TokenPair

CPU_MODEL = ModelConfig(
    model_type="llama",
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=384,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
)


def model_flops(cfg: ModelConfig, n_params: int, pairs: int, seq: int) -> float:
    """Model FLOPs of one DPO step: policy fwd+bwd and reference fwd on 2·pairs sequences."""
    tokens = 2 * pairs * seq
    attn_fwd = 2 * pairs * 4 * cfg.num_layers * seq * seq * cfg.num_heads * cfg.head_dim / 2
    return 6 * n_params * tokens + 2 * n_params * tokens + 3 * attn_fwd + attn_fwd


def _pairs(cfg, n, seq, rng):
    prompt = seq // 2
    out = []
    for _ in range(n):
        p = tuple(int(x) for x in rng.integers(1, cfg.vocab_size, prompt))
        c = tuple(int(x) for x in rng.integers(1, cfg.vocab_size, seq - prompt))
        r = tuple(int(x) for x in rng.integers(1, cfg.vocab_size, seq - prompt))
        out.append(TokenPair(p, c, r))
    return out


def _time(fn, repeats):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def logprob_ratio(d: int, v: int, n: int, dtype, repeats: int, chunk: int) -> dict:
    """Tiled log-prob kernel fwd+bwd time over four [n, d] x [d, v] matmuls (same process)."""
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    h = (jax.random.normal(k1, (n, d), jnp.float32) * 0.5).astype(dtype)
    w = (jax.random.normal(k2, (d, v), jnp.float32) / math.sqrt(d)).astype(dtype)
    t = jax.random.randint(k3, (n,), 0, v)
    grad = jax.jit(jax.grad(lambda a, b: token_logprobs(a, b, t, chunk_size=chunk).sum(), (0, 1)))
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    kernel = _time(lambda: grad(h, w), repeats)
    one = _time(lambda: mm(h, w), repeats)
    m = min(n, 256)
    got = token_logprobs(h[:m], w, t[:m], chunk_size=chunk)
    want = naive_token_logprobs(h[:m], w, t[:m])
    tol = 1e-3 if dtype == jnp.float32 else 5e-2
    assert float(jnp.max(jnp.abs(got - want))) < tol, "log-prob kernel disagrees with naive"
    return dict(kernel_fwd_bwd_s=kernel, matmul_s=one, ratio_to_four_matmuls=kernel / (4 * one))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="GPU sizes (Qwen2.5-1.5B, T=2048, bf16)")
    ap.add_argument("--model", default="", help="directory or config.json of the shape")
    ap.add_argument("--pairs", type=int, default=0)
    ap.add_argument("--seq", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--max_tokens_per_device", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=0, help="log-prob row chunk")
    ap.add_argument("--peak_tflops", type=float, default=989.0)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)

    if a.gpu:
        cfg = ModelConfig.from_hf_file(a.model or "configs/models/qwen2.5_1.5b")
        pairs, seq, dtype, chunk = a.pairs or 8, a.seq or 2048, jnp.bfloat16, a.chunk or 4096
    else:
        cfg = ModelConfig.from_hf_file(a.model) if a.model else CPU_MODEL
        pairs, seq, dtype, chunk = a.pairs or 4, a.seq or 64, jnp.float32, a.chunk or 256
    mesh = make_mesh(fsdp=a.fsdp) if a.fsdp > 1 else None
    settings = UpdateSettings(
        loss=LossSettings(kind="dpo"),
        optim=OptimizerSettings(1e-6, num_steps=1000),
        train=StepSettings(
            compute_dtype=dtype,
            chunk_size=chunk,
            remat=a.remat,
            attention_impl=a.attention,
            max_tokens_per_device=a.max_tokens_per_device or None,
        ),
    )
    step = update_step_from(cfg, settings, mesh=mesh)
    opt = step.optimizer
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    state = init_player_state(params, opt)
    if mesh is not None:
        state = shard_state(state, cfg, mesh)
    batch = collate_pairs(
        _pairs(cfg, pairs, seq, np.random.default_rng(0)),
        pad_id=0,
        data_parallel_size=step.data_parallel_size,
        length_buckets=(seq,),
    )

    t0 = time.perf_counter()
    compiled = step.lower(state, batch)
    temp = compiled.compile().memory_analysis().temp_size_in_bytes
    state, m = step(state, batch)
    first = {k: float(v) for k, v in m.items()}
    compile_s = time.perf_counter() - t0
    assert abs(first["loss"] - math.log(2)) < 1e-3, f"first DPO loss {first['loss']} != log 2"
    assert math.isfinite(first["grad_norm"]) and first["grad_norm"] > 0, first
    times, cpu = [], []
    for _ in range(a.steps):
        t1, c1 = time.perf_counter(), time.process_time()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t1)
        cpu.append(time.process_time() - c1)
    med = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    assert step.cache_size() == 1, "the update step recompiled between steps"
    tokens = 2 * pairs * seq
    flops = model_flops(cfg, n_params, pairs, seq)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    peak = (stats or {}).get("peak_bytes_in_use")
    n_dev = mesh.size if mesh is not None else 1
    lp = logprob_ratio(
        cfg.hidden_size, cfg.vocab_size, min(tokens // n_dev, 16384), dtype, a.steps, chunk
    )
    out = dict(
        device=dev.device_kind,
        params=n_params,
        pairs=pairs,
        seq=seq,
        tokens=tokens,
        step_s=med,
        step_cpu_s=statistics.median(cpu),
        peak_rss_bytes=rss,
        tokens_per_s=tokens / med,
        tflops=flops / med / 1e12,
        mfu=flops / med / (a.peak_tflops * 1e12 * n_dev),
        compile_s=compile_s,
        peak_bytes=peak,
        compiled_temp_bytes=temp,
        **lp,
    )
    print(
        f"{out['device']}: {n_params / 1e9:.3f}B params, {pairs} pairs x {seq} tokens: "
        f"step {med * 1e3:.1f} ms (median of {a.steps}; CPU {out['step_cpu_s'] * 1e3:.0f} ms), "
        f"{out['tokens_per_s']:.0f} tokens/s, "
        f"{out['tflops']:.2f} TFLOP/s, MFU {out['mfu']:.1%} (peak {a.peak_tflops} TFLOP/s); "
        f"peak memory {peak / 2**30 if peak else float('nan'):.2f} GiB, compiled temporaries "
        f"{temp / 2**30:.2f} GiB, peak RSS {rss / 2**30:.2f} GiB; log-prob fwd+bwd / four matmuls "
        f"{lp['ratio_to_four_matmuls']:.2f}"
    )
    print("ok: first loss = log 2, finite gradients, log-prob kernel = naive")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
