"""Compile-only capacity analysis of the update step: build abstract (never allocated) player
states and batches at a model's real shape, lower and compile the real update step on a mesh,
and read back per-device bytes (``compiled.memory_analysis()``) and the collectives of the
compiled program (``compiled.as_text()``).

Everything here works on ``jax.ShapeDtypeStruct`` inputs, so an 8B-parameter plan compiles on
a laptop's virtual CPU devices (``--xla_force_host_platform_device_count``). ``launch/plan.py``
is the command-line front end; tests call these functions directly.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from advgame_jax.models import DEFAULT_RULES, ModelConfig, param_shardings
from advgame_jax.models.params import param_shapes
from advgame_jax.training.batching import PairBatch, SampleBatch
from advgame_jax.training.sharding import batch_shardings, state_shardings
from advgame_jax.training.state import StateSettings

GIB = 1024**3

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
# "%name = f32[128,2048,32,128]{...} all-gather(" and tuple results "(f32[..], bf16[..]) all-reduce("
_OP_RE = re.compile(
    r"=\s*(\([^=]*?\)|[a-z0-9]+\[[0-9,]*\][^ ]*)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\("
)
_SINGLETON_GROUPS = re.compile(r"replica_groups=\{\{\d+\}(,\{\d+\})*\}")
_SHAPE_RE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program: its kind and result shapes/bytes (per device)."""

    kind: str
    shapes: tuple[str, ...]
    dims: tuple[tuple[int, ...], ...]
    bytes: int


def parse_collectives(hlo_text: str) -> list[Collective]:
    """Every collective op of an HLO module text (async ``-start`` halves counted once;
    collectives whose replica groups are single devices are dropped).

    Shapes are as the CPU compiler writes them: XLA:CPU upcasts bf16 matmul operands to fp32
    before gathering them, so an FSDP weight gather shows as f32 here (bf16 on GPU/TPU)."""
    out = []
    for m in _OP_RE.finditer(hlo_text):
        result, kind = m.group(1), m.group(2)
        line_end = hlo_text.find("\n", m.end())
        tail = hlo_text[m.end() : line_end if line_end >= 0 else None]
        if _SINGLETON_GROUPS.search(tail):
            continue  # every replica group holds one device: no communication
        shapes, dims, nbytes = [], [], 0
        for dt, ds in _SHAPE_RE.findall(result):
            if dt not in _DTYPE_BYTES:
                continue
            d = tuple(int(x) for x in ds.split(",") if x)
            shapes.append(f"{dt}[{','.join(map(str, d))}]")
            dims.append(d)
            nbytes += _DTYPE_BYTES[dt] * math.prod(d)
        if m.group(3) and len(dims) > 1 and kind in ("all-gather", "collective-permute"):
            # An async start returns (operand, result[, ...]): keep the largest as the result.
            i = int(np.argmax([math.prod(d) for d in dims]))
            dt_i = re.match(r"[a-z]+[0-9]*", shapes[i])
            assert dt_i is not None  # shapes[i] starts with its dtype name (built above)
            shapes, dims, nbytes = (
                [shapes[i]],
                [dims[i]],
                _DTYPE_BYTES[dt_i.group(0)] * math.prod(dims[i]),
            )
        out.append(Collective(kind, tuple(shapes), tuple(dims), nbytes))
    return out


def abstract_params(config: ModelConfig, dtype=jnp.float32):
    """The param tree of ``config`` as ``ShapeDtypeStruct`` in ``dtype``."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_shapes(config))


def abstract_state(
    config: ModelConfig,
    optimizer,
    mesh,
    settings: StateSettings = StateSettings(),
    *,
    rules=DEFAULT_RULES,
):
    """A player's state as sharded ``ShapeDtypeStruct`` (nothing allocated): a trainable
    player's :class:`PlayerState`, or a frozen player's params alone (``settings.trainable``
    False: no optimizer state, no θ̄ or θ₀)."""
    params = abstract_params(config, settings.param_dtype)
    if not settings.trainable:
        sh = param_shardings(config, mesh, rules)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, sh
        )
    state = jax.eval_shape(lambda p: settings.init(p, optimizer), params)
    shard = state_shardings(state, config, mesh, rules)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shard
    )


def abstract_batch(kind: str, rows: int, length: int, mesh, rules=DEFAULT_RULES):
    """A collated batch of ``rows`` pairs ('pairs') or samples ('samples') of ``length``
    tokens, as sharded ``ShapeDtypeStruct`` (rows split over the batch axes)."""
    i32, b, f32 = jnp.int32, jnp.bool_, jnp.float32
    # Any: abstract stand-ins for the batch's arrays (the fields are typed as concrete arrays).
    S: Any = jax.ShapeDtypeStruct
    if kind == "pairs":
        shp = (rows, 2, length)
        batch = PairBatch(
            tokens=S(shp, i32),
            positions=S(shp, i32),
            attention_mask=S(shp, b),
            loss_mask=S(shp, b),
            pair_valid=S((rows,), b),
            pair_weight=S((rows,), f32),
        )
    elif kind == "samples":
        shp = (rows, length)
        batch = SampleBatch(
            tokens=S(shp, i32),
            positions=S(shp, i32),
            attention_mask=S(shp, b),
            loss_mask=S(shp, b),
            advantages=S((rows,), f32),
            sampler_logprobs=S(shp, f32),
            has_sampler_logprobs=S((rows,), b),
            sample_valid=S((rows,), b),
            sample_weight=S((rows,), f32),
        )
    else:
        raise ValueError(f"batch kind must be 'pairs' or 'samples', got {kind!r}")
    sh = batch_shardings(batch, mesh, rules)
    return jax.tree.map(lambda x, s: S(x.shape, x.dtype, sharding=s), batch, sh)


def tree_bytes(tree) -> int:
    """Total bytes of a tree of arrays / ShapeDtypeStructs (global, not per device)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (max over devices)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sh: Optional[NamedSharding] = getattr(x, "sharding", None)
        shape = sh.shard_shape(x.shape) if sh is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def compile_report(step, state, batch) -> dict:
    """Lower and compile ``step`` (an ``UpdateStep``) for abstract ``state`` and ``batch``;
    return per-device bytes, compile seconds and the collectives (largest first)."""
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    colls = sorted(parse_collectives(compiled.as_text()), key=lambda c: -c.bytes)
    return dict(
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        state_bytes=tree_bytes(state),
        state_bytes_per_device=per_device_bytes(state),
        batch_bytes_per_device=per_device_bytes(batch),
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        collectives=[dataclasses.asdict(c) for c in colls],
    )
