"""Collation of the game's token records (``advgame_jax.types``) into padded, bucketed numpy
batches for the update step.

Bucketing keeps the set of shapes small so a changing number of pairs or lengths does not
recompile the update step:

* rows (pairs / samples): ``m × 2^k`` with ``m = num_microbatches × data_parallel_size``
  (every microbatch splits evenly over the batch-sharding devices), or the smallest entry of
  an explicit ``pair_buckets`` that fits (each must be a multiple of ``m``);
* sequence length: the smallest of ``16, 24, 32, 48, 64, 96, …`` (``2^k`` and ``3·2^(k-1)``,
  at most one third of a row is padding and only two shapes per octave), or of an explicit
  ``length_buckets``, that holds the longest prompt + completion.

Sequences longer than the largest length bucket (or ``max_length``) raise a ``ValueError`` by
default (``overflow='error'``): silently cutting a prompt would train on a context the sampler
never saw. ``overflow='truncate_prompt'`` instead drops prompt tokens from the left (never
completion tokens) and logs how many rows were cut.

Layout: rows are right-padded with ``pad_id``; ``positions`` count from 0 at the first token;
``loss_mask`` is True on completion tokens, aligned with ``tokens`` (the update step shifts it
to the predicting positions). Weights: a record's ``weight`` goes to ``pair_weight`` /
``sample_weight``; records without one get ``1 / (records in the call)``, so the objective is
their mean. Padding rows have ``attention_mask`` on their first token only
(so no attention row is empty) and are excluded by ``pair_valid`` / ``sample_valid``.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import flax.struct
import numpy as np

from advgame_jax.types import TokenPair, TokenSample

MIN_LENGTH_BUCKET = 16
OVERFLOW_MODES = ("error", "truncate_prompt")


@flax.struct.dataclass
class PairBatch:
    """DPO/IPO batch of P pairs (row 0 = chosen, row 1 = rejected), length T.

    tokens, positions: int32 [P, 2, T]; attention_mask, loss_mask: bool [P, 2, T];
    pair_valid: bool [P] (False for bucket padding); pair_weight: float32 [P], each pair's
    coefficient in the objective ``Σ_i weight_i · loss_i`` (0 on padding rows).
    """

    tokens: np.ndarray
    positions: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    pair_valid: np.ndarray
    pair_weight: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(np.sum(self.pair_valid))


@flax.struct.dataclass
class SampleBatch:
    """GRPO batch of S samples, length T.

    tokens, positions: int32 [S, T]; attention_mask, loss_mask: bool [S, T];
    advantages: float32 [S]; sampler_logprobs: float32 [S, T], the sampler's log-prob of
    ``tokens[s, t]`` at completion positions (0 elsewhere); has_sampler_logprobs: bool [S];
    sample_valid: bool [S]; sample_weight: float32 [S], as ``PairBatch.pair_weight``.
    """

    tokens: np.ndarray
    positions: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    advantages: np.ndarray
    sampler_logprobs: np.ndarray
    has_sampler_logprobs: np.ndarray
    sample_valid: np.ndarray
    sample_weight: np.ndarray

    @property
    def num_samples(self) -> int:
        return int(np.sum(self.sample_valid))


def length_bucket(
    n: int, length_buckets: Sequence[int] = (), max_length: Optional[int] = None
) -> int:
    """Smallest length bucket ≥ n; raises ``ValueError`` if none fits."""
    if length_buckets:
        fits = [
            b for b in sorted(length_buckets) if b >= n and (max_length is None or b <= max_length)
        ]
        if not fits:
            raise ValueError(
                f"a sequence of {n} tokens exceeds the largest length bucket "
                f"{max(length_buckets)} (train.length_buckets)"
            )
        return fits[0]
    b = MIN_LENGTH_BUCKET
    while b < n:
        b = b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3
    if max_length is not None and b > max_length:
        if n <= max_length:
            return max_length
        raise ValueError(f"a sequence of {n} tokens exceeds max_length={max_length}")
    return b


def row_bucket(n: int, multiple: int = 1, buckets: Sequence[int] = ()) -> int:
    """Smallest row count ≥ max(n, 1) that is a bucket and a multiple of ``multiple``."""
    if multiple < 1:
        raise ValueError(f"num_microbatches × data-parallel size must be ≥ 1, got {multiple}")
    n = max(n, 1)
    if buckets:
        bad = [b for b in buckets if b % multiple]
        if bad:
            raise ValueError(
                f"train.pair_buckets {tuple(bad)} are not multiples of "
                f"num_microbatches × data-parallel size = {multiple}"
            )
        fits = [b for b in sorted(buckets) if b >= n]
        if not fits:
            raise ValueError(
                f"{n} pairs/samples exceed the largest train.pair_buckets entry {max(buckets)}"
            )
        return fits[0]
    k = 1
    while k * multiple < n:
        k *= 2
    return k * multiple


def _fit_lengths(prompts, completions, t_max, overflow, what):
    """Drop prompt tokens from the left where prompt + completion > t_max (or raise)."""
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    out, cut = [], 0
    for prompt, comps in zip(prompts, completions, strict=True):
        longest = max(len(c) for c in comps)
        excess = len(prompt) + longest - t_max
        if excess > 0:
            if overflow == "error" or longest >= t_max:
                raise ValueError(
                    f"{what}: prompt ({len(prompt)}) + completion ({longest}) tokens exceed the "
                    f"largest length bucket {t_max}; raise max_length / length_buckets or use "
                    f"overflow='truncate_prompt'"
                )
            prompt = prompt[excess:]
            cut += 1
        out.append(prompt)
    if cut:
        logging.warning(
            "%s: truncated the prompt of %d row(s) from the left to fit %d tokens", what, cut, t_max
        )
    return out


def _weights(records, n_rows: int, what: str) -> np.ndarray:
    """float32 [n_rows]: each record's ``weight``, or ``1 / len(records)`` for every record
    when none carries one (a plain mean); 0 on padding rows. Mixing is an error."""
    given = [r.weight is not None for r in records]
    if any(given) and not all(given):
        raise ValueError(
            f"{what}: either every record carries a weight or none does "
            f"({sum(given)} of {len(records)} have one)"
        )
    w = np.zeros((n_rows,), np.float32)
    if records:
        w[: len(records)] = [float(r.weight) for r in records] if all(given) else 1.0 / len(records)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{what}: record weights must be finite")
    return w


def _fill(tokens, attn, lmask, pos, prompt, completion):
    n_p, n = len(prompt), len(prompt) + len(completion)
    tokens[:n_p] = prompt
    tokens[n_p:n] = completion
    attn[:n] = True
    lmask[n_p:n] = True
    pos[:n] = np.arange(n)


def _lengths_and_bucket(prompts, completions, length_buckets, max_length):
    longest = max(
        (len(p) + max(len(c) for c in cs) for p, cs in zip(prompts, completions, strict=True)),
        default=1,
    )
    cap = max(length_buckets) if length_buckets else max_length
    if cap is not None and longest > cap:
        return cap
    return length_bucket(max(longest, 1), length_buckets, max_length)


def collate_pairs(
    pairs: Sequence[TokenPair],
    *,
    pad_id: int,
    pair_buckets: Sequence[int] = (),
    length_buckets: Sequence[int] = (),
    num_microbatches: int = 1,
    data_parallel_size: int = 1,
    max_length: Optional[int] = None,
    overflow: str = "error",
) -> PairBatch:
    """Pad and bucket preference pairs into a :class:`PairBatch` (see module docstring).

    ``data_parallel_size``: number of devices the batch dim is sharded over (``data × fsdp``
    of the mesh, ``training.sharding.batch_parallel_size(mesh)``). An empty ``pairs`` gives a
    batch of padding rows whose update is a no-op.
    """
    for i, p in enumerate(pairs):
        if not p.chosen_ids or not p.rejected_ids:
            raise ValueError(f"pair {i}: chosen and rejected completions must be non-empty")
    prompts = [tuple(p.prompt_ids) for p in pairs]
    comps = [(tuple(p.chosen_ids), tuple(p.rejected_ids)) for p in pairs]
    t = _lengths_and_bucket(prompts, comps, length_buckets, max_length)
    prompts = _fit_lengths(prompts, comps, t, overflow, "collate_pairs")
    n_rows = row_bucket(len(pairs), num_microbatches * data_parallel_size, pair_buckets)

    tokens = np.full((n_rows, 2, t), pad_id, np.int32)
    positions = np.zeros((n_rows, 2, t), np.int32)
    attn = np.zeros((n_rows, 2, t), bool)
    lmask = np.zeros((n_rows, 2, t), bool)
    attn[:, :, 0] = True
    for i, (prompt, cs) in enumerate(zip(prompts, comps, strict=True)):
        for j, c in enumerate(cs):
            _fill(tokens[i, j], attn[i, j], lmask[i, j], positions[i, j], prompt, c)
    valid = np.zeros((n_rows,), bool)
    valid[: len(pairs)] = True
    return PairBatch(
        tokens=tokens,
        positions=positions,
        attention_mask=attn,
        loss_mask=lmask,
        pair_valid=valid,
        pair_weight=_weights(pairs, n_rows, "collate_pairs"),
    )


def collate_samples(
    samples: Sequence[TokenSample],
    *,
    pad_id: int,
    sample_buckets: Sequence[int] = (),
    length_buckets: Sequence[int] = (),
    num_microbatches: int = 1,
    data_parallel_size: int = 1,
    max_length: Optional[int] = None,
    overflow: str = "error",
) -> SampleBatch:
    """Pad and bucket GRPO samples into a :class:`SampleBatch` (buckets as for pairs).

    ``sampler_logprobs`` of a sample, when given, must have one entry per completion token.
    """
    for i, s in enumerate(samples):
        if not s.completion_ids:
            raise ValueError(f"sample {i}: completion must be non-empty")
        if s.sampler_logprobs is not None and len(s.sampler_logprobs) != len(s.completion_ids):
            raise ValueError(
                f"sample {i}: {len(s.sampler_logprobs)} sampler_logprobs for "
                f"{len(s.completion_ids)} completion tokens"
            )
    prompts = [tuple(s.prompt_ids) for s in samples]
    comps = [(tuple(s.completion_ids),) for s in samples]
    t = _lengths_and_bucket(prompts, comps, length_buckets, max_length)
    prompts = _fit_lengths(prompts, comps, t, overflow, "collate_samples")
    n_rows = row_bucket(len(samples), num_microbatches * data_parallel_size, sample_buckets)

    tokens = np.full((n_rows, t), pad_id, np.int32)
    positions = np.zeros((n_rows, t), np.int32)
    attn = np.zeros((n_rows, t), bool)
    lmask = np.zeros((n_rows, t), bool)
    attn[:, 0] = True
    adv = np.zeros((n_rows,), np.float32)
    slp = np.zeros((n_rows, t), np.float32)
    has_slp = np.zeros((n_rows,), bool)
    for i, (s, prompt) in enumerate(zip(samples, prompts, strict=True)):
        _fill(tokens[i], attn[i], lmask[i], positions[i], prompt, s.completion_ids)
        adv[i] = s.advantage
        if s.sampler_logprobs is not None:
            n_p = len(prompt)
            slp[i, n_p : n_p + len(s.completion_ids)] = s.sampler_logprobs
            has_slp[i] = True
    valid = np.zeros((n_rows,), bool)
    valid[: len(samples)] = True
    return SampleBatch(
        tokens=tokens,
        positions=positions,
        attention_mask=attn,
        loss_mask=lmask,
        advantages=adv,
        sampler_logprobs=slp,
        has_sampler_logprobs=has_slp,
        sample_valid=valid,
        sample_weight=_weights(samples, n_rows, "collate_samples"),
    )
