"""This machine's peaks, measured in-process, as a ``steptime.Hardware`` (``--cluster=cpu``).

Measured in the same process (and so under the same load) as whatever is predicted from them:

- memory bandwidth: a jitted ``x * a + b`` over a 128 MiB fp32 array (one read + one write);
- matmul peak: a jitted fp32 1024 × 1024 × 1024 product;
- a call's fixed cost: a jitted scalar op dispatched and waited for;
- the achieved matmul rate at a model's own shapes (``model_matmul_mfu``: one layer's
  projections and the LM head over a microbatch of tokens, as a fraction of the peak; small
  widths reach a small fraction of the 1024-cube peak);
- a decode step's floor (``decode_step_seconds``): a ``lax.while_loop`` of the model's own
  one-token decode step (``forward_with_cache``) at the sampler's batch and cache length.
  With a tiny model this per-step cost of XLA:CPU running each op of
  the loop body as its own task, not bandwidth or FLOPs, sets the decode speed; it cannot be
  derived from the peaks, so it is measured, and reported as such.

Each figure is the median of ``repeats`` timed runs after a warm-up. ``mfu = bw_eff = 1``: the
measured figures are already what programs reach on this machine.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from advgame_jax.training.steptime import Hardware

# Module-level programs: compiled once per shape, so repeated measurements time only the run.
_scale = jax.jit(lambda v: v * 1.0001 + 0.5)
_matmul = jax.jit(lambda x, y: x @ y)
_add_one = jax.jit(lambda v: v + 1)
_chain = jax.jit(lambda x, ws: [x[:, : w.shape[0]] @ w for w in ws])


def _median_seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def memory_bandwidth(nbytes: int = 128 << 20, repeats: int = 5) -> float:
    x = jnp.ones((nbytes // 4,), jnp.float32)
    s = _median_seconds(_scale, x, repeats=repeats)
    return 2 * nbytes / s


def matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    b = jnp.ones((n, n), jnp.float32)
    s = _median_seconds(_matmul, a, b, repeats=repeats)
    return 2.0 * n**3 / s


def call_overhead(repeats: int = 20) -> float:
    x = jnp.float32(1.0)
    return _median_seconds(_add_one, x, repeats=repeats)


def model_matmul_mfu(mc, tokens: int, peak: float, repeats: int = 5) -> float:
    """Achieved FLOP/s of one layer's matmuls + the LM head at ``tokens`` rows, / ``peak``."""
    d, f = mc.hidden_size, mc.intermediate_size
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    shapes = [(d, q + 2 * kv), (q, d), (d, 2 * f), (f, d), (d, mc.vocab_size)]
    ws = [jnp.full(s, 1e-3, jnp.float32) for s in shapes]
    x = jnp.ones((tokens, max(d, q, f)), jnp.float32)

    sec = _median_seconds(_chain, x, ws, repeats=repeats)
    flops = sum(2.0 * tokens * a * b for a, b in shapes)
    return min(flops / sec / peak, 1.0)


@dataclasses.dataclass(frozen=True)
class TokenSelection:
    """How a measured decode step picks its token (the sampler's ``select_tokens`` settings:
    temperature 0 = greedy, top_p 1 and top_k 0 = no filter, ``use_filter`` = run the
    top-p / top-k filter at all)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    use_filter: bool = False


def decode_step_seconds(
    mc,
    params,
    rows: int,
    cache_len: int,
    *,
    selection: TokenSelection = TokenSelection(),
    iterations: int = 32,
    repeats: int = 3,
) -> float:
    """Seconds per decode step of the model's own one-token step and token selection (the
    sampler's ``select_tokens`` with per-row keys) at ``rows`` × ``cache_len``, in a while
    loop (its program is compiled once per shape and setting)."""
    from advgame_jax.models import init_cache

    program = _decode_program(mc, rows, cache_len, iterations, selection)
    cache = init_cache(mc, rows, cache_len, dtype=jnp.float32)
    seeds = jnp.zeros((rows, 4), jnp.uint32)
    return _median_seconds(program, params, cache, seeds, repeats=repeats) / iterations


def _decode_program(mc, rows: int, cache_len: int, iterations: int, selection: TokenSelection):
    """The jitted ``run(params, cache, seeds)``: ``iterations`` one-token steps (cached)."""
    from advgame_jax.models import CacheSlots, forward_with_cache
    from advgame_jax.sampling.decode import row_keys, select_tokens

    sel = TokenSelection(
        float(selection.temperature),
        float(selection.top_p),
        int(selection.top_k),
        bool(selection.use_filter),
    )
    key = (mc, rows, cache_len, iterations, sel.temperature, sel.top_p, sel.top_k, sel.use_filter)
    if key in _DECODE_PROGRAMS:
        return _DECODE_PROGRAMS[key]
    kv_mask = jnp.ones((rows, cache_len), bool)
    temp = jnp.full((rows,), sel.temperature, jnp.float32)
    tp, tk = jnp.full((rows,), sel.top_p, jnp.float32), jnp.full((rows,), sel.top_k, jnp.int32)

    def run(params, cache, seeds):
        keys = row_keys(seeds)

        def body(c):
            i, tok, cache = c
            logits, cache = forward_with_cache(
                params,
                mc,
                tok,
                jnp.full((rows, 1), i),
                cache,
                CacheSlots(i, kv_mask),
                compute_dtype=jnp.float32,
                last_only=True,
            )
            logits = logits.reshape(rows, -1, logits.shape[-1])[:, -1]
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
            nxt, _ = select_tokens(logits, temp, tp, tk, step_keys, use_filter=sel.use_filter)
            return i + 1, nxt.astype(jnp.int32)[:, None], cache

        tok0 = jnp.zeros((rows, 1), jnp.int32)
        return jax.lax.while_loop(lambda c: c[0] < iterations, body, (0, tok0, cache))[1]

    _DECODE_PROGRAMS[key] = jax.jit(run)
    return _DECODE_PROGRAMS[key]


_DECODE_PROGRAMS: dict = {}


def measure_cpu(
    *,
    model=None,
    params=None,
    tokens: int = 0,
    decode_rows: int = 0,
    cache_len: int = 0,
    repeats: int = 5,
) -> Hardware:
    """This machine as a ``Hardware``, measured now (see module doc). Without ``model``: the
    peaks only (mfu = 1, no per-step cost). With ``model`` (a ModelConfig): mfu at its shapes
    over ``tokens`` rows; with ``params`` too: its decode step's fixed cost at
    ``decode_rows`` × ``cache_len``."""
    bw = memory_bandwidth(repeats=repeats)
    peak = matmul_peak(repeats=repeats)
    mfu = model_matmul_mfu(model, tokens, peak, repeats) if model is not None and tokens else 1.0
    step = (
        decode_step_seconds(model, params, decode_rows, cache_len, repeats=repeats)
        if params is not None and decode_rows
        else 0.0
    )
    return Hardware(
        name="cpu (measured)",
        peak_flops=peak,
        hbm_bw=bw,
        disk_bw=bw / 10,
        net_bw=bw,
        mfu=mfu,
        bw_eff=1.0,
        call_overhead_s=call_overhead(),
        decode_step_floor_s=step,
    )


def mean_hardware(a: Hardware, b: Hardware) -> Hardware:
    """Figures measured before and after a measured span, averaged (load drifts)."""
    avg = {
        f: (getattr(a, f) + getattr(b, f)) / 2
        for f in (
            "peak_flops",
            "hbm_bw",
            "disk_bw",
            "net_bw",
            "mfu",
            "bw_eff",
            "call_overhead_s",
            "decode_step_floor_s",
        )
    }
    return Hardware(name=a.name, **avg)
