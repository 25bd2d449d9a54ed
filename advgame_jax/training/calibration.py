"""This machine's figures, measured in-process, as a ``steptime.Hardware`` (``--cluster=cpu``
and the step-time calibration).

Measured in the same process (and so under the same load) as whatever is predicted from them;
each figure is the median of ``repeats`` timed runs after a warm-up:

- read bandwidth: the faster of a jitted sum and a matrix-vector product over 1 GiB (larger
  than the caches), nothing of that size written: what decode's weight and cache reads reach;
- copy bandwidth: a jitted ``x * a + b`` over 512 MiB, read + write bytes: what an update's
  activation and optimizer traffic (each byte read and written) reaches;
- matmul peak: a jitted fp32 1024 × 1024 × 1024 product;
- a call's fixed cost: a jitted scalar op dispatched and waited for;
- at a model's own shapes: the matmul rate of one layer's projections and the LM head over a
  microbatch of tokens (``model_matmul_mfu``, a fraction of the peak); the rate at which
  few-row products stream the model's whole weight set (``decode_stream_rate``: a decode
  step's weight traffic, as a fraction of the read bandwidth); the sampler's token selection
  over the vocabulary (``selection_seconds``: compute, not traffic, on a CPU).

None of these runs the model's decode step or update itself: ``generation_hardware`` and
``update_hardware`` combine them into the figures ``steptime`` predicts a call from, and
tests/test_plan_calibration.py checks the prediction against a real model's game steps.
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


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes/s read + written by ``x * a + b`` over ``nbytes`` (a fresh output per call)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    s = _median_seconds(_scale, x, repeats=repeats)
    return 2 * nbytes / s


_reads = (jax.jit(jnp.sum), jax.jit(lambda v: v.reshape(-1, 1024) @ jnp.ones(1024, v.dtype)))


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s read by the faster of a sum and a matrix-vector product over ``nbytes``
    (nothing of that size written; larger than the caches of the machines measured)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    return max(nbytes / _median_seconds(f, x, repeats=repeats) for f in _reads)


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
    """How a decode step picks its token (the sampler's ``select_tokens`` settings:
    temperature 0 = greedy, top_p 1 and top_k 0 = no filter, ``use_filter`` = run the
    top-p / top-k filter at all)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    use_filter: bool = False


def _decode_weights(mc) -> list:
    """The matrices one decode step streams, as the sampler's per-layer split holds them
    (``[out, in]``, q/k/v and gate/up fused), and the tied LM head ``[vocab, d]``."""
    d, f = mc.hidden_size, mc.intermediate_size
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    per_layer = [(q + 2 * kv, d), (d, q), (2 * f, d), (d, f)]
    shapes = per_layer * mc.num_layers + [(mc.vocab_size, d)]
    return [jnp.full(s, 1e-3, jnp.float32) for s in shapes]


@jax.jit
def _stream(x, ws):
    # One product after another, as in a decode step: each input waits on the previous
    # product's result (a negligible scalar added), so the runtime cannot run them side by
    # side; each result is reduced, nothing of it kept.
    dims, s = (((1,), (1,)), ((), ())), jnp.zeros((), x.dtype)
    for w in ws:
        s = jnp.sum(jax.lax.dot_general(x[:, : w.shape[1]] + s, w, dims)) * 1e-30
    return s


def decode_stream_rate(mc, rows: int, repeats: int = 5) -> float:
    """Bytes/s at which ``rows``-row products stream the model's whole weight set (every
    layer's own matrices, so nothing stays in cache between steps): a decode step's
    weight traffic at that batch."""
    ws = _decode_weights(mc)
    x = jnp.ones((rows, max(w.shape[1] for w in ws)), jnp.float32)
    seconds = _median_seconds(_stream, x, ws, repeats=repeats)
    return sum(w.size * 4 for w in ws) / seconds


_SELECT_PROGRAMS: dict = {}


def selection_seconds(
    rows: int, vocab: int, selection: TokenSelection = TokenSelection(), repeats: int = 5
) -> float:
    """Seconds of the sampler's token selection (``select_tokens`` with per-row keys: log-
    softmax, the top-p / top-k filter when used, the Gumbel draw when sampling) for ``rows``
    rows over ``vocab`` logits."""
    from advgame_jax.sampling.decode import row_keys, select_tokens

    sel = selection
    key = (rows, vocab, float(sel.temperature), float(sel.top_p), int(sel.top_k), sel.use_filter)
    if key not in _SELECT_PROGRAMS:
        temp = jnp.full((rows,), sel.temperature, jnp.float32)
        tp, tk = jnp.full((rows,), sel.top_p, jnp.float32), jnp.full((rows,), sel.top_k, jnp.int32)

        def run(logits, seeds):
            return select_tokens(logits, temp, tp, tk, row_keys(seeds), use_filter=sel.use_filter)

        _SELECT_PROGRAMS[key] = jax.jit(run)
    logits = jax.random.normal(jax.random.PRNGKey(0), (rows, vocab), jnp.float32) * 3.0
    seeds = jnp.arange(rows * 4, dtype=jnp.uint32).reshape(rows, 4)
    return _median_seconds(_SELECT_PROGRAMS[key], logits, seeds, repeats=repeats)


def measure_cpu(repeats: int = 5) -> Hardware:
    """This machine's peaks as a ``Hardware``, measured now: read bandwidth, the 1024-cube
    matmul rate and a call's fixed cost (mfu = bw_eff = 1: nothing at a model's shapes)."""
    bw = read_bandwidth(repeats=repeats)
    return Hardware(
        name="cpu (measured)",
        peak_flops=matmul_peak(repeats=repeats),
        hbm_bw=bw,
        disk_bw=bw / 10,
        net_bw=bw,
        mfu=1.0,
        bw_eff=1.0,
        call_overhead_s=call_overhead(),
    )


def generation_hardware(
    base: Hardware, mc, rows: int, prefill_tokens: int, selection: TokenSelection, repeats=3
) -> Hardware:
    """``base`` with a sampler call's figures at its shapes: the weight-streaming rate of
    ``rows``-row products (as ``bw_eff`` of the read bandwidth), the matmul rate of the
    prefill's ``prefill_tokens`` rows (``mfu``, of the peak measured with it) and the token
    selection per row and step."""
    stream, peak = decode_stream_rate(mc, rows, repeats), matmul_peak(repeats=repeats)
    return dataclasses.replace(
        base,
        bw_eff=min(stream / base.hbm_bw, 1.0),
        peak_flops=peak,
        mfu=model_matmul_mfu(mc, prefill_tokens, peak, repeats),
        select_s_per_row=selection_seconds(rows, mc.vocab_size, selection, repeats) / rows,
    )


def update_hardware(base: Hardware, mc, tokens: int, repeats: int = 3) -> Hardware:
    """``base`` with an update's figures: traffic at the copy bandwidth (its activations and
    optimizer state are read and written) and the matmul rate at a microbatch's ``tokens``
    rows (``mfu``, of the peak measured with it)."""
    peak = matmul_peak(repeats=repeats)
    return dataclasses.replace(
        base,
        hbm_bw=copy_bandwidth(repeats=repeats),
        bw_eff=1.0,
        peak_flops=peak,
        mfu=model_matmul_mfu(mc, tokens, peak, repeats),
    )


def mean_hardware(a: Hardware, b: Hardware) -> Hardware:
    """Figures measured before and after a measured span, averaged (the load drifts)."""
    fields = [f.name for f in dataclasses.fields(Hardware) if f.name != "name"]
    return Hardware(name=a.name, **{f: (getattr(a, f) + getattr(b, f)) / 2 for f in fields})
