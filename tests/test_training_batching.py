"""Collation of TokenPair / TokenSample into bucketed, right-padded batches, checked against
hand-built golden arrays."""

import logging

import numpy as np
import pytest

from advgame_jax.training import collate_pairs, collate_samples, length_bucket, row_bucket
from advgame_jax.types import TokenPair, TokenSample


def test_pair_layout_golden():
    pairs = [TokenPair((5, 6), (7, 8, 9), (10,)), TokenPair((11,), (12,), (13, 14))]
    b = collate_pairs(pairs, pad_id=0, length_buckets=(8,))
    assert b.tokens.shape == (2, 2, 8) and b.tokens.dtype == np.int32
    np.testing.assert_array_equal(
        b.tokens[0], [[5, 6, 7, 8, 9, 0, 0, 0], [5, 6, 10, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        b.tokens[1], [[11, 12, 0, 0, 0, 0, 0, 0], [11, 13, 14, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        b.attention_mask[0].astype(int), [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        b.loss_mask[0].astype(int), [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        b.loss_mask[1].astype(int), [[0, 1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(b.positions[0, 0, :5], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(b.pair_valid, [True, True])
    assert b.num_pairs == 2


def test_row_buckets_are_powers_of_two_times_the_device_multiple():
    assert [row_bucket(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
    assert [row_bucket(n, 8) for n in (1, 8, 9, 17)] == [8, 8, 16, 32]
    assert [row_bucket(n, 6) for n in (1, 7, 13)] == [6, 12, 24]
    assert row_bucket(5, 2, (4, 8, 16)) == 8
    with pytest.raises(ValueError, match="not multiples"):
        row_bucket(3, 4, (6, 8))
    with pytest.raises(ValueError, match="exceed the largest"):
        row_bucket(17, 1, (8, 16))
    pairs = [TokenPair((1,), (2,), (3,))] * 5
    b = collate_pairs(pairs, pad_id=0, num_microbatches=2, data_parallel_size=4)
    assert b.tokens.shape[0] == 8 and b.pair_valid.tolist() == [True] * 5 + [False] * 3
    # Padding rows attend to one token so no attention row is empty; no loss on them.
    assert b.attention_mask[5:].sum() == 3 * 2 and not b.loss_mask[5:].any()


def test_length_buckets():
    assert [length_bucket(n) for n in (1, 16, 17, 24, 25, 33, 49, 65, 100, 129)] == [
        16,
        16,
        24,
        24,
        32,
        48,
        64,
        96,
        128,
        192,
    ]
    assert length_bucket(40, (32, 64, 128)) == 64
    assert length_bucket(200, max_length=256) == 256  # 256 is a bucket
    assert length_bucket(200, max_length=250) == 250  # capped at max_length
    with pytest.raises(ValueError, match="exceeds max_length=250"):
        length_bucket(251, max_length=250)
    with pytest.raises(ValueError, match="largest length bucket 64"):
        length_bucket(65, (32, 64))


def test_overflow_raises_or_truncates_prompt_from_the_left(caplog):
    pairs = [TokenPair(tuple(range(1, 11)), (20, 21, 22), (23,)), TokenPair((1,), (2,), (3,))]
    with pytest.raises(
        ValueError, match="prompt \\(10\\) \\+ completion \\(3\\).*largest length bucket 8"
    ):
        collate_pairs(pairs, pad_id=0, length_buckets=(8,))
    with caplog.at_level(logging.WARNING):
        b = collate_pairs(pairs, pad_id=0, length_buckets=(8,), overflow="truncate_prompt")
    assert any("truncated the prompt of 1 row" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(b.tokens[0, 0], [6, 7, 8, 9, 10, 20, 21, 22])
    np.testing.assert_array_equal(b.tokens[0, 1], [6, 7, 8, 9, 10, 23, 0, 0])
    np.testing.assert_array_equal(b.loss_mask[0, 0].astype(int), [0, 0, 0, 0, 0, 1, 1, 1])
    long_completion = [TokenPair((1,), tuple(range(2, 12)), (3,))]
    with pytest.raises(ValueError):
        collate_pairs(long_completion, pad_id=0, length_buckets=(8,), overflow="truncate_prompt")
    with pytest.raises(ValueError, match="non-empty"):
        collate_pairs([TokenPair((1,), (), (3,))], pad_id=0)


def test_empty_pairs_give_an_all_padding_batch():
    b = collate_pairs([], pad_id=0, pair_buckets=(4,), length_buckets=(16,))
    assert b.tokens.shape == (4, 2, 16) and not b.pair_valid.any() and b.num_pairs == 0


def test_sample_layout_golden():
    samples = [
        TokenSample((5, 6), (7, 8), 1.5, (-0.5, -0.25)),
        TokenSample((9,), (10, 11, 12), -2.0),
    ]
    b = collate_samples(
        samples, pad_id=0, length_buckets=(8,), num_microbatches=2, data_parallel_size=2
    )
    assert b.tokens.shape == (4, 8)
    np.testing.assert_array_equal(
        b.tokens[:2], [[5, 6, 7, 8, 0, 0, 0, 0], [9, 10, 11, 12, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        b.loss_mask[:2].astype(int), [[0, 0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]]
    )
    np.testing.assert_allclose(b.sampler_logprobs[0], [0, 0, -0.5, -0.25, 0, 0, 0, 0])
    assert b.has_sampler_logprobs.tolist() == [True, False, False, False]
    np.testing.assert_allclose(b.advantages, [1.5, -2.0, 0.0, 0.0])
    assert b.sample_valid.tolist() == [True, True, False, False] and b.num_samples == 2
    with pytest.raises(ValueError, match="1 sampler_logprobs for 2 completion tokens"):
        collate_samples([TokenSample((1,), (2, 3), 0.0, (-1.0,))], pad_id=0)
