"""Per-token log-probs of a row-sharded batch, computed shard by shard.

``token_logprobs`` works on ``[N, d]`` hidden states; handed a ``[R, T, d]`` array whose rows
are split over devices, XLA's partitioner may gather every device's hidden states (and then
run the vocabulary head on all of them on every device). :func:`sharded_sequence_logprobs`
instead wraps the kernel in ``jax.shard_map``: each device flattens ITS rows and runs the
kernel on them, with the unembedding replicated inside (under FSDP that is a gather of the
weights, whose gradient is reduced back). Without a mesh, or when the rows are not split, it
is the plain kernel.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import Mesh, PartitionSpec

from advgame_jax.models.sharding import DEFAULT_RULES, logical_to_spec
from advgame_jax.ops.logprobs import token_logprobs, token_logprobs_and_entropy


def _flat(hidden, unembed, targets, chunk_size, with_entropy, vocab_major):
    r, t, d = hidden.shape
    h, tg = hidden.reshape(r * t, d), targets.reshape(r * t)
    kw = dict(chunk_size=chunk_size, vocab_major=vocab_major)
    if with_entropy:
        lp, ent = token_logprobs_and_entropy(h, unembed, tg, **kw)
        return lp.reshape(r, t), ent.reshape(r, t)
    return token_logprobs(h, unembed, tg, **kw).reshape(r, t), None


def sharded_sequence_logprobs(
    hidden,
    unembed,
    targets,
    *,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    mesh: Optional[Mesh] = None,
    rules=DEFAULT_RULES,
    vocab_major: bool = False,
):
    """hidden ``[R, T, d]``, unembed ``[d, V]`` (``[V, d]`` with ``vocab_major``), targets
    ``[R, T]`` int → (log-probs ``[R, T]`` fp32, entropies ``[R, T]`` fp32 or None); rows
    split over the logical ``batch`` axes."""
    if mesh is None:
        return _flat(hidden, unembed, targets, chunk_size, with_entropy, vocab_major)
    rows = logical_to_spec(hidden.shape, ("batch", None, None), mesh, rules)[0]
    if rows is None:
        return _flat(hidden, unembed, targets, chunk_size, with_entropy, vocab_major)
    row_spec = PartitionSpec(rows, None)
    out_specs = (row_spec, row_spec if with_entropy else None)

    def local(h, w, tg):
        return _flat(h, w, tg, chunk_size, with_entropy, vocab_major)

    # check_vma=False: the kernel's scans carry per-device statistics of replicated shape.
    fn = jax.shard_map(
        local,
        mesh=mesh,
        out_specs=out_specs,
        check_vma=False,
        in_specs=(PartitionSpec(rows, None, None), PartitionSpec(), row_spec),
    )
    return fn(hidden, unembed, targets)
