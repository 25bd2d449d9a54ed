"""The jitted core of the JAX sampler: prefill + KV-cache decode loop + token selection.

Pure functions of (params, arrays) with the model config and the bucket sizes as static
arguments, so one compiled program serves every call whose shapes fall in the same bucket and
new weights never trigger a recompilation. Batching, bucketing, sharding and the translation
to ``Completion`` records live in ``jax_sampler.py``.

Per-row controls are arrays, not static values, so a batch may mix requests with different
temperatures, top-p / top-k, token budgets, stop ids and seeds:

    tokens       [B, P] int32   left-padded prompts (the last column is every row's last token)
    prompt_mask  [B, P] bool    True on real prompt tokens
    temperature  [B] f32        0 = greedy (argmax of the logits)
    top_p        [B] f32        nucleus mass in (0, 1]; 1 keeps everything
    top_k        [B] int32      0 keeps everything
    max_new      [B] int32      per-row budget, 1 <= max_new <= N (the static bucket)
    stop_ids     [B, K] int32   per-row stop ids, -1 padded
    seeds        [B, 4] uint32  (seed low word, seed high word, prompt index, sample index)

Randomness: row r at decode step t draws with ``fold_in(row_key_r, t)`` where
``row_key_r = fold_in^4(key(0), seeds[r])``; a row's draws therefore depend only on its own
seed words and logits, never on which other rows share the batch or on the batch bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from advgame_jax.models import CacheSlots, ModelConfig, forward_with_cache, init_cache
from advgame_jax.models.kv_cache import grow_cache, split_layers


class DecodeOut(NamedTuple):
    """Result of one ``generate_tokens`` call (all on device).

    tokens [B, N] int32 (entries at or after ``num_tokens`` are filler), logprobs [B, N] f32
    (model log-softmax of each emitted token, before temperature / top-p / top-k),
    num_tokens [B] int32, stopped [B] bool (a stop id ended the row).
    """

    tokens: jax.Array
    logprobs: jax.Array
    num_tokens: jax.Array
    stopped: jax.Array


def row_keys(seeds: jax.Array) -> jax.Array:
    """One typed PRNG key per row from its four uint32 seed words. seeds [B, 4] -> keys [B]."""

    def one(words):
        key = jax.random.key(0)
        for i in range(4):
            key = jax.random.fold_in(key, words[i])
        return key

    return jax.vmap(one)(seeds)


MAX_CANDIDATES = 256  # top-k candidate set of the filtered path (see ``filter_cutoff``)
_BISECT_STEPS = 48


def filter_cutoff(scaled, top_p, top_k, *, max_candidates: int = MAX_CANDIDATES):
    """Per row, the smallest scaled logit that top-p / top-k filtering keeps.

    scaled [B, V] f32, top_p [B] f32, top_k [B] int32 -> cutoff [B] f32. Tokens with
    ``scaled >= cutoff`` are kept. Exactly what a full descending sort would give: with
    ``n_p`` the number of sorted ranks whose preceding mass is < ``top_p`` (the smallest prefix
    whose mass reaches ``top_p``, crossing token included) and ``n_k = top_k`` (or V when 0),
    the cutoff is the ``min(n_p, n_k)``-th largest value; tokens tied with it are kept too.

    Without sorting the vocabulary: ``lax.top_k`` takes the ``K = max_candidates`` largest
    values, and their probabilities under the full softmax (normaliser over all V tokens)
    give the cut whenever it falls inside them (``0 < top_k <= K``, or the K candidates
    already hold ``top_p`` of the mass), the usual case. Rows where it does not are resolved
    by a bisection on the threshold over the whole vocabulary (``_BISECT_STEPS`` masked
    reductions, run only when some row needs it, via ``lax.cond``), which converges to the
    same cutoff.
    """
    b, vocab = scaled.shape
    k = min(int(max_candidates), vocab)
    lse = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    vals, _ = jax.lax.top_k(scaled, k)  # [B, K], descending
    probs = jnp.exp(vals - lse)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    rank = jnp.arange(k, dtype=jnp.int32)[None, :]
    keep = (mass_before < top_p[:, None]) & ((top_k[:, None] <= 0) | (rank < top_k[:, None]))
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    cutoff = jnp.take_along_axis(vals, (n_keep - 1)[:, None], axis=-1)[:, 0]
    unfiltered = (top_p >= 1.0) & (top_k <= 0)  # e.g. a plain row batched with filtered ones
    cutoff = jnp.where(unfiltered, -jnp.inf, cutoff)
    exact = unfiltered | ((top_k > 0) & (top_k <= k)) | (jnp.sum(probs, axis=-1) >= top_p)

    def full(_):
        return jnp.where(exact, cutoff, _bisect_cutoff(scaled, lse, vals[:, 0], top_p, top_k))

    return jax.lax.cond(jnp.all(exact), lambda _: cutoff, full, None)


def _bisect_cutoff(scaled, lse, top_value, top_p, top_k):
    """``filter_cutoff`` over the whole vocabulary, by bisection on the threshold: per row,
    the higher of the top-p cut (the largest threshold whose kept mass still reaches top_p)
    and the top-k cut (the largest whose kept count still reaches top_k)."""
    p_full = jnp.exp(scaled - lse)
    lo0 = jnp.min(scaled, axis=-1)  # keeps everything: always satisfies both rules
    hi0 = top_value

    def ok(t):
        kept = scaled >= t[:, None]
        mass_ok = jnp.sum(jnp.where(kept, p_full, 0.0), axis=-1) >= top_p
        count_ok = (top_k <= 0) | (jnp.sum(kept, axis=-1) >= top_k)
        return mass_ok, count_ok

    def step(_, carry):
        lo_p, hi_p, lo_k, hi_k = carry
        mid_p, mid_k = (lo_p + hi_p) / 2, (lo_k + hi_k) / 2
        mass_ok, _ = ok(mid_p)
        _, count_ok = ok(mid_k)
        return (
            jnp.where(mass_ok, mid_p, lo_p),
            jnp.where(mass_ok, hi_p, mid_p),
            jnp.where(count_ok, mid_k, lo_k),
            jnp.where(count_ok, hi_k, mid_k),
        )

    lo_p, hi_p, lo_k, hi_k = jax.lax.fori_loop(0, _BISECT_STEPS, step, (lo0, hi0, lo0, hi0))
    # lo converges from below to the largest logit satisfying the rule (hi may satisfy it
    # itself, e.g. when the top token alone holds top_p); snap it up to that logit.
    mass_hi, _ = ok(hi_p)
    _, count_hi = ok(hi_k)
    t_p = jnp.where(mass_hi, hi_p, lo_p)
    t_k = jnp.where(top_k > 0, jnp.where(count_hi, hi_k, lo_k), -jnp.inf)

    def snap(t):
        return jnp.min(jnp.where(scaled >= t[:, None], scaled, jnp.inf), axis=-1)

    return jnp.maximum(snap(t_p), snap(t_k))


def select_tokens(
    logits,
    temperature,
    top_p,
    top_k,
    keys,
    *,
    use_filter: bool,
    max_candidates: int = MAX_CANDIDATES,
):
    """Pick one token per row and return it with its log-prob under the raw model.

    logits [B, V] f32 -> (tokens [B] int32, logprobs [B] f32). Rows with temperature 0 take
    the argmax; others sample from softmax(logits / T), restricted (when ``use_filter``) to
    the top-k tokens and to the smallest prefix of the sorted distribution whose mass reaches
    ``top_p`` (the token that crosses ``top_p`` is kept). Tokens tied with the last kept
    value are kept too, because the cut is a threshold on the scaled logits. The vocabulary
    is never sorted (``filter_cutoff``).
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    # argmax as the first index holding the max: one max and one index reduction, cheaper on
    # XLA:CPU than its (value, index) argmax reduction; the max serves the log-prob too.
    first = jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab)
    greedy = jnp.minimum(jnp.min(first, axis=-1), vocab - 1)  # a NaN row: the last id
    do_sample = temperature > 0

    def sample(logits):
        scaled = logits / jnp.where(do_sample, temperature, 1.0)[:, None]
        if use_filter:
            cutoff = filter_cutoff(scaled, top_p, top_k, max_candidates=max_candidates)
            scaled = jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf)
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    # Greedy fast path: the scaling, the filter and the Gumbel draw over the whole vocabulary
    # (B x V threefry bits, the dearest part of a CPU decode step) run only when some row
    # samples.
    sampled = jax.lax.cond(jnp.any(do_sample), sample, lambda _: greedy, logits)
    tokens = jnp.where(do_sample, sampled, greedy)
    # log_softmax at the chosen token only (the same arithmetic: (x - max) - log sum exp).
    shifted = logits - top
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    return tokens, jnp.take_along_axis(shifted, tokens[:, None], axis=-1)[:, 0] - lse


def _batch_constraint(x, batch_spec):
    if batch_spec is None:
        return x
    return jax.lax.with_sharding_constraint(x, batch_spec(x.ndim))


class DecodeBatch(NamedTuple):
    """The per-row input arrays of one ``generate_tokens`` call (module docstring's table):
    host numpy arrays when packed, device arrays inside the program."""

    tokens: Any
    prompt_mask: Any
    temperature: Any
    top_p: Any
    top_k: Any
    max_new: Any
    stop_ids: Any
    seeds: Any


@dataclasses.dataclass(frozen=True)
class DecodeProgram:
    """The static choices that select one compiled decode program (hashable; a jit static
    argument). ``compute_dtype`` / ``cache_dtype``: dtype names; ``max_new_bucket``: N;
    ``split_layers``: slice the stacked layer weights into per-layer buffers once, before the
    loop (``models.kv_cache.split_layers``; a transient copy of the layer weights), so no
    decode step copies a layer's weights out of the stack (XLA:CPU does, every step).
    ``decode_phases``: run the decode loop in up to this many phases over a growing cache
    (``decode_windows``), so a step's attention reads the slots written so far rounded up to
    its phase's end, not the whole P + N bucket; 1: one loop over the full cache."""

    config: ModelConfig
    max_new_bucket: int
    compute_dtype: str
    cache_dtype: str
    use_filter: bool
    split_layers: bool = False
    decode_phases: int = 1


MIN_PHASE_STEPS = 32  # the shortest decode phase (each phase compiles its own loop body)


def decode_windows(prompt_len: int, n_max: int, phases: int) -> list[tuple[int, int]]:
    """The decode loop's phases as (end, cache slots): phase j runs the steps ``t < end_j``
    (after the previous phase's) on a cache of ``prompt_len + end_j`` slots, which holds
    every slot a step of the phase writes (step t writes slot ``prompt_len + t - 1``).

    Up to ``phases`` phases of equal length (a multiple of 16, at least
    ``MIN_PHASE_STEPS``); the last one ends at ``n_max`` with the full ``prompt_len + n_max``
    cache, so one phase is the plain loop."""
    length = -(-n_max // max(int(phases), 1))
    length = max(MIN_PHASE_STEPS, -(-length // 16) * 16)
    ends = [e for e in range(length, n_max, length)] + [n_max]
    return [(e, prompt_len + e) for e in ends]


class _Loop(NamedTuple):
    """The decode loop's carry."""

    t: jax.Array
    cache: Any
    kv_mask: jax.Array
    out_tok: jax.Array
    out_lp: jax.Array
    done: jax.Array
    stopped: jax.Array
    num: jax.Array


def generate_tokens(
    params, batch: DecodeBatch, program: DecodeProgram, batch_spec=None
) -> DecodeOut:
    """Prefill the left-padded prompts, then decode until every row is done.

    Shapes as in the module docstring; N = ``program.max_new_bucket``. The cache holds P + N
    slots: prompt slot p is slot p, generated token t is written at slot P + t. The decode
    loop is one ``lax.while_loop`` per phase (``decode_windows``; the cache grows between
    phases, to P + N slots in the last), each exiting as soon as all rows have stopped or
    spent their budget. ``batch_spec(ndim)``, when given, returns the sharding that splits axis 0 over
    ``data``.
    """
    if program.split_layers:
        params = split_layers(params)
    keys = row_keys(batch.seeds)
    positions = jnp.maximum(jnp.cumsum(batch.prompt_mask.astype(jnp.int32), axis=-1) - 1, 0)
    next_pos = positions[:, -1] + 1
    windows = decode_windows(batch.tokens.shape[1], program.max_new_bucket, program.decode_phases)
    state = _prefill(params, batch, program, (positions, keys, windows[0][1]), batch_spec)

    def body(state: _Loop) -> _Loop:
        return _decode_step(params, batch, program, state, next_pos, keys)

    for end, slots in windows:
        # A phase with no row left running exits at once (its cond is false).
        if state.kv_mask.shape[1] < slots:
            cache, kv_mask = grow_cache(state.cache, state.kv_mask, slots)
            state = state._replace(cache=cache, kv_mask=kv_mask)
        state = jax.lax.while_loop(lambda s, end=end: (s.t < end) & ~jnp.all(s.done), body, state)
    return DecodeOut(state.out_tok, state.out_lp, state.num, state.stopped)


def _is_stop(batch: DecodeBatch, tok):
    return jnp.any(batch.stop_ids == tok[:, None], axis=-1)


def _select(batch: DecodeBatch, program: DecodeProgram, logits, keys, t):
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)
    return select_tokens(
        logits,
        batch.temperature,
        batch.top_p,
        batch.top_k,
        step_keys,
        use_filter=program.use_filter,
    )


def _prefill(params, batch: DecodeBatch, program: DecodeProgram, start, batch_spec):
    """Run the prompts through the model, pick every row's first token: the loop's start
    (``start``: positions, row keys and the first phase's cache slots)."""
    positions, keys, slots = start
    n_batch, prompt_len = batch.tokens.shape
    n_max = program.max_new_bucket
    kv_mask = jnp.concatenate(
        [batch.prompt_mask.astype(bool), jnp.zeros((n_batch, slots - prompt_len), bool)], axis=-1
    )
    cache = init_cache(program.config, n_batch, slots, dtype=jnp.dtype(program.cache_dtype))
    logits, cache = forward_with_cache(
        params,
        program.config,
        batch.tokens,
        positions.astype(jnp.int32),
        cache,
        CacheSlots(jnp.int32(0), kv_mask),
        compute_dtype=jnp.dtype(program.compute_dtype),
        last_only=True,
    )
    tok0, lp0 = _select(batch, program, logits, keys, 0)
    out_tok = _batch_constraint(jnp.zeros((n_batch, n_max), jnp.int32), batch_spec)
    out_lp = _batch_constraint(jnp.zeros((n_batch, n_max), jnp.float32), batch_spec)
    stopped = _is_stop(batch, tok0)
    return _Loop(
        t=jnp.int32(1),
        cache=cache,
        kv_mask=kv_mask,
        out_tok=out_tok.at[:, 0].set(tok0),
        out_lp=out_lp.at[:, 0].set(lp0),
        done=stopped | (batch.max_new <= 1),
        stopped=stopped,
        num=jnp.ones((n_batch,), jnp.int32),
    )


def _decode_step(params, batch: DecodeBatch, program: DecodeProgram, state: _Loop, next_pos, keys):
    """One token for every row still running (finished rows write filler)."""
    n_batch, prompt_len = batch.tokens.shape
    t = state.t
    slot = prompt_len + t - 1
    kv_mask = jax.lax.dynamic_update_slice(
        state.kv_mask, jnp.ones((n_batch, 1), bool), (jnp.int32(0), slot)
    )
    prev = jax.lax.dynamic_slice(state.out_tok, (jnp.int32(0), t - 1), (n_batch, 1))
    pos = (next_pos + t - 1)[:, None].astype(jnp.int32)
    logits, cache = forward_with_cache(
        params,
        program.config,
        prev,
        pos,
        state.cache,
        CacheSlots(slot.astype(jnp.int32), kv_mask),
        compute_dtype=jnp.dtype(program.compute_dtype),
        last_only=True,
    )
    tok, lp = _select(batch, program, logits, keys, t)
    active = ~state.done
    tok = jnp.where(active, tok, 0)
    lp = jnp.where(active, lp, 0.0)
    hit = active & _is_stop(batch, tok)
    return _Loop(
        t=t + 1,
        cache=cache,
        kv_mask=kv_mask,
        out_tok=jax.lax.dynamic_update_slice(state.out_tok, tok[:, None], (jnp.int32(0), t)),
        out_lp=jax.lax.dynamic_update_slice(state.out_lp, lp[:, None], (jnp.int32(0), t)),
        done=state.done | hit | (t + 1 >= batch.max_new),
        stopped=state.stopped | hit,
        num=state.num + active.astype(jnp.int32),
    )
