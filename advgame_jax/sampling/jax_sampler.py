"""JaxSampler: the JAX-native KV-cache ``Sampler`` (prefill + decode on the model core).

Owns batching, shape bucketing, sharding and weight swaps around the jitted program in
``decode.py``; turns its arrays into ``Completion`` records.

Bucket scheme (bounds the number of compiled programs): rows are grouped by program (new-token
bucket, filter flag), sorted by prompt length and cut into chunks of at most
``max_batch_size`` rows; each chunk is padded to the next power of two >=
``min_batch_bucket`` (and a multiple of the mesh's data-parallel size, ``data`` x ``fsdp``);
the prompt length is padded (on the left) to the next power of two >= ``min_prompt_bucket``;
the cache reserves the next power of two >= ``min_new_bucket`` new tokens (each row stops at
its own ``max_new_tokens``); stop-id lists are padded to the next power of two >= 4.
Temperature, top-p, top-k, budgets, stop ids and seeds are runtime arrays, so only those
shapes and one boolean (some row needs top-k / top-p filtering) select a program. A sampler
that sees batches up to 256 rows, prompts up to 2048 tokens and up to 1024 new tokens thus
compiles at most 9 (batch) x 8 (prompt) x 7 (new tokens) x 2 (filter) programs with <= 4
stop ids, in practice a handful. Programs are shared by every sampler of the same model
config in the process.

Weights are jit arguments, never closed over: ``load_weights`` (the ``Sampler`` contract,
``InMemoryWeights`` only) casts the new pytree to the dtype and shardings of the current one,
so the next call hits the compiled program; completions carry the loaded version.

Mesh: params take the model's logical shardings (FSDP / tensor axes); rows are split over the
batch axes (``data`` x ``fsdp``). Every array entering the program is built with
``jax.make_array_from_process_local_data`` from this process's rows and only this process's
rows are read back, so on a multi-host pod each process passes its own prompts (all processes
call ``generate`` together, with the same number of chunks and buckets) and nothing mixes
host-local with global arrays. Top-p / top-k never sort the vocabulary (``decode.filter_cutoff``).

Seeds: row (prompt i, sample j) of a call with ``SamplingParams.seed`` s draws from a key
derived from (s, i, j) only, so a call reproduces itself exactly and a request's samples do
not depend on which other requests share its batch (the HTTP server relies on this).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from advgame_jax.models import ModelConfig, load_hf, param_shardings
from advgame_jax.models.kv_cache import split_layers
from advgame_jax.sampling.base import (
    Completion,
    InMemoryWeights,
    SamplerCounters,
    SamplingParams,
    WeightsRef,
    over_budget_completions,
    wrong_ref,
)
from advgame_jax.sampling.decode import DecodeBatch, DecodeProgram, generate_tokens

BATCH_AXES = ("data", "fsdp")
DECODE_PHASES = 4  # decode phases of a CPU sampler without a mesh (``DecodeProgram``)


def next_pow2(x: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(x, minimum)."""
    x = max(int(x), int(minimum), 1)
    return 1 << (x - 1).bit_length()


def default_compute_dtype():
    """bf16 on accelerators, fp32 on CPU (tests compare fp32 against torch)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Batch and shape limits of a ``JaxSampler`` (module docstring's bucket scheme).

    ``max_batch_size``: rows per compiled call (larger requests are split; results are the
    same). ``max_prompt_len``: the prompt budget. The minima: smallest batch / prompt /
    new-token buckets (a server raises them to compile fewer programs).
    """

    max_batch_size: int = 256
    max_prompt_len: int = 4096
    min_batch_bucket: int = 1
    min_prompt_bucket: int = 16
    min_new_bucket: int = 16


@dataclasses.dataclass(frozen=True)
class _Row:
    prompt: tuple[int, ...]
    params: SamplingParams
    prompt_index: int
    sample_index: int


class JaxSampler:
    """KV-cache sampler over a model-core param pytree.

    Args:
      config: the model's ``ModelConfig``.
      params: param pytree (as from ``load_hf`` / ``init_params``).
      tokenizer: any object with ``.decode(ids, skip_special_tokens=True)``; None leaves
        ``Completion.text`` empty.
      mesh: optional ``(data, fsdp, tensor)`` mesh; params are placed with
        ``param_shardings`` and the batch is split over ``data`` x ``fsdp``.
      compute_dtype: matmul dtype (default: bf16 on accelerators, fp32 on CPU); the KV cache
        is kept in the same dtype.
      **buckets: the ``Buckets`` fields (``max_batch_size``, ``max_prompt_len``,
        ``min_batch_bucket``, ``min_prompt_bucket``, ``min_new_bucket``). A prompt longer
        than ``max_prompt_len`` (the ``prompt_budget``) gets ``n`` empty completions with
        finish reason "length" (the game's MAX_LENGTH error for that slot), counted in
        ``stats()["prompt_too_long"]``, instead of failing the whole batch.
      copy_params: keep a private copy of ``params`` (default), so the caller may donate them
        to a training step; False adopts the given buffers.
      keep_decode_weights: on one CPU device (no mesh or a one-device mesh), keep the per-layer decode layout of
        the weights (``models.kv_cache.split_layers``) between ``generate`` calls, made on the
        first call after construction or ``load_weights``: one more copy of the layer weights
        in memory, instead of a transient copy made by every call (≈ 0.8 s of a SmolLM2-135M
        call). Default True where the split applies; False splits per call.
    """

    def __init__(
        self,
        config: ModelConfig,
        params,
        *,
        tokenizer=None,
        mesh: Optional[Mesh] = None,
        compute_dtype=None,
        copy_params: bool = True,
        keep_decode_weights: bool = True,
        **buckets: int,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.compute_dtype = jnp.dtype(compute_dtype or default_compute_dtype())
        limits = Buckets(**buckets)
        self.max_prompt_len = int(limits.max_prompt_len)
        self.counters = SamplerCounters()
        self.min_batch_bucket = int(limits.min_batch_bucket)
        self.min_prompt_bucket = int(limits.min_prompt_bucket)
        self.min_new_bucket = int(limits.min_new_bucket)
        # The batch splits over every data-parallel mesh axis (the "batch" logical rule).
        self._batch_axes = tuple(
            a for a in BATCH_AXES if mesh is not None and mesh.shape.get(a, 1) > 1
        )
        self._data_size = (
            math.prod(mesh.shape[a] for a in self._batch_axes) if mesh is not None else 1
        )
        self.max_batch_size = max(int(limits.max_batch_size), self._data_size)
        self._param_shardings = param_shardings(config, mesh) if mesh is not None else None
        self.params = self._place(params, like=None, copy=copy_params)
        # XLA:CPU copies a layer's weights out of the stacked params at every decode step;
        # one split per call avoids it (a transient copy; accelerators keep the stack).
        self.split_layers = jax.default_backend() == "cpu"
        # On one CPU device (no mesh, or a mesh of one device) the decode runs in phases over
        # a growing cache, so attention reads about the written slots, not the whole bucket
        # (``decode.decode_windows``); a sharded sampler keeps the one-loop program.
        one_cpu = self.split_layers and (mesh is None or mesh.devices.size == 1)
        self.decode_phases = DECODE_PHASES if one_cpu else 1
        self.keep_decode_weights = bool(keep_decode_weights) and one_cpu
        self._decode_params = None  # the kept split copy (``_program_params``)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_dir(cls, path, *, dtype=jnp.float32, tokenizer: Any = "auto", mesh=None, **kw):
        """Load an HF checkpoint dir (``save_hf`` output); the tokenizer is read from the same
        directory when ``tokenizer == "auto"`` and it holds one."""
        shardings = None
        if mesh is not None:
            cfg_file = os.path.join(path, "config.json")
            with open(cfg_file) as f:
                shardings = param_shardings(
                    ModelConfig.from_hf_dict(json.load(f), source=cfg_file), mesh
                )
        config, params = load_hf(path, dtype, shardings=shardings)
        if tokenizer == "auto":
            tokenizer = _maybe_tokenizer(path)
        return cls(config, params, tokenizer=tokenizer, mesh=mesh, copy_params=False, **kw)

    def _place(self, params, like, copy: bool = True):
        """Put ``params`` on device with the dtypes and shardings of ``like`` (or as given).

        With ``copy`` the sampler never aliases the caller's buffers, so a trainer may donate
        or delete its arrays after handing them over.
        """
        if like is None:
            like = params
        else:
            got, want = jax.tree.structure(params), jax.tree.structure(like)
            if got != want:
                raise ValueError(
                    f"load_weights: param tree structure {got} does not match the sampler's {want}"
                )
        shardings = self._param_shardings
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, like)

        def put(new, old, sharding):
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(
                    f"load_weights: param shape {tuple(new.shape)} does not "
                    f"match the sampler's {tuple(old.shape)}"
                )
            cast = new.astype(old.dtype) if new.dtype != old.dtype else new
            alias = None if (cast is not new or not copy) else False
            return jax.device_put(cast, sharding, may_alias=alias)

        return jax.tree.map(put, params, like, shardings)

    # ------------------------------------------------------------------ the Sampler contract
    @property
    def prompt_budget(self) -> int:
        """The longest prompt accepted (``max_prompt_len``)."""
        return self.max_prompt_len

    def load_weights(self, ref: WeightsRef) -> int:
        """Swap in ``ref.params`` (``InMemoryWeights``, a pytree like the current one)
        without recompiling; returns ``ref.version``, stamped on every later completion.
        The sampler keeps its own copy unless ``ref.copy`` is False. An Orbax checkpoint is
        read with ``sampling.checkpoints.restore_params(path, like=sampler.params)`` first."""
        if not isinstance(ref, InMemoryWeights):
            raise wrong_ref(self, ref, InMemoryWeights)
        self._decode_params = None  # the kept split copy is of the old weights
        self.params = self._place(ref.params, like=self.params, copy=ref.copy)
        return self.counters.loaded(ref.version)

    def stats(self) -> dict[str, Any]:
        return self.counters.as_dict()

    def close(self) -> None:
        """Drop the sampler's weights (idempotent): their memory is freed now, not whenever
        the last reference goes. The compiled programs stay (they are shared); a later
        ``generate`` raises."""
        self.params = None
        self._decode_params = None

    def _program_params(self):
        """The params the decode program takes: the kept split copy (made now if missing)
        when ``keep_decode_weights``, else ``params`` (the program splits its own)."""
        if not self.keep_decode_weights:
            return self.params
        if self._decode_params is None:
            self._decode_params = _split_jit(self.params)
        return self._decode_params

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        """``params.n`` completions per prompt, grouped by prompt (see ``Sampler``)."""
        return self.generate_many([(prompt_token_ids, params)])[0]

    def generate_many(self, requests):
        """Serve several ``(prompt_token_ids, SamplingParams)`` requests in shared batches.

        Returns one list of completions per request, each exactly what ``generate`` would
        return for that request alone (same seeds → same tokens).
        """
        rows: list[Optional[_Row]] = []  # None: a prompt over budget, answered already
        results: list[Optional[Completion]] = []
        for prompts, sp in requests:
            for i, prompt in enumerate(prompts):
                prompt = tuple(int(t) for t in prompt)
                if not prompt:
                    raise ValueError(f"generate: prompt {i} is empty; expected >= 1 token id")
                if len(prompt) > self.max_prompt_len:
                    # Over budget: no tokens, finish "length" (the game's MAX_LENGTH), counted.
                    self.counters.prompt_too_long += 1
                    results.extend(over_budget_completions(sp.n, self.counters.weights_version))
                    rows.extend(None for _ in range(sp.n))
                    continue
                bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
                if bad:
                    raise ValueError(
                        f"generate: prompt {i} holds token id {bad[0]} outside "
                        f"[0, {self.config.vocab_size})"
                    )
                rows.extend(_Row(prompt, sp, i, j) for j in range(sp.n))
                results.extend(None for _ in range(sp.n))
        # Rows that share a program (same new-token bucket, same filter flag) run together;
        # sorting by prompt length keeps the padding small inside each chunk.
        live = {r: row for r, row in enumerate(rows) if row is not None}
        order = sorted(live, key=lambda r: (self._program_key(live[r]), len(live[r].prompt)))
        start = 0
        while start < len(order):
            key = self._program_key(live[order[start]])
            stop = start
            while (
                stop < len(order)
                and stop - start < self.max_batch_size
                and self._program_key(live[order[stop]]) == key
            ):
                stop += 1
            chunk = order[start:stop]
            for idx, comp in zip(
                chunk, self._run_chunk([live[r] for r in chunk], *key), strict=True
            ):
                results[idx] = comp
            start = stop
        out, pos = [], 0
        for prompts, sp in requests:
            k = len(prompts) * sp.n
            out.append(results[pos : pos + k])
            pos += k
        return out

    def _program_key(self, row: _Row):
        sp = row.params
        use_filter = sp.temperature > 0 and (sp.top_k > 0 or sp.top_p < 1.0)
        return next_pow2(sp.max_new_tokens, self.min_new_bucket), bool(use_filter)

    def _run_chunk(self, rows: list[_Row], max_new_bucket: int, use_filter: bool):
        batch = self._pack(rows)
        if self.mesh is not None:
            # Each process holds only its own rows: they become its slice of one global batch
            # (on one process this is a plain device_put).
            batch = DecodeBatch(
                *(
                    jax.make_array_from_process_local_data(self._batch_sharding(a.ndim), a)
                    for a in batch
                )
            )
        program = DecodeProgram(
            config=self.config,
            max_new_bucket=max_new_bucket,
            compute_dtype=self.compute_dtype.name,
            cache_dtype=self.compute_dtype.name,
            use_filter=use_filter,
            split_layers=self.split_layers,
            decode_phases=self.decode_phases,
        )
        batch_sharding = self._batch_sharding(2) if self.mesh is not None else None
        if self.params is None:
            raise RuntimeError("JaxSampler.generate after close(): the sampler has no weights")
        params = self._program_params()
        out = _generate_jit(params, batch, program=program, batch_sharding=batch_sharding)
        return self._completions(rows, *(_local_rows(a) for a in out))

    def _pack(self, rows: list[_Row]) -> DecodeBatch:
        """The chunk's rows as host arrays, padded to its batch / prompt / stop-id buckets."""
        b = min(
            next_pow2(len(rows), max(self._data_size, self.min_batch_bucket)),
            next_pow2(self.max_batch_size),
        )
        b = int(math.ceil(b / self._data_size) * self._data_size)
        p = next_pow2(max(len(r.prompt) for r in rows), self.min_prompt_bucket)
        k = next_pow2(max(len(r.params.stop_token_ids) for r in rows), 4)
        tokens = np.zeros((b, p), np.int32)
        mask = np.zeros((b, p), bool)
        temperature = np.zeros((b,), np.float32)
        top_p = np.ones((b,), np.float32)
        top_k = np.zeros((b,), np.int32)
        max_new = np.ones((b,), np.int32)
        stop_ids = np.full((b, k), -1, np.int32)
        seeds = np.zeros((b, 4), np.uint32)
        # Filler rows repeat row 0's prompt so they never see an all-masked attention row.
        for r in range(b):
            row = rows[r] if r < len(rows) else rows[0]
            sp = row.params
            n = len(row.prompt)
            tokens[r, p - n :] = row.prompt
            mask[r, p - n :] = True
            temperature[r] = sp.temperature
            top_p[r] = sp.top_p
            top_k[r] = sp.top_k
            max_new[r] = sp.max_new_tokens if r < len(rows) else 1
            stop_ids[r, : len(sp.stop_token_ids)] = sp.stop_token_ids
            seed = int(sp.seed) % (1 << 64)
            seeds[r] = (seed & 0xFFFFFFFF, seed >> 32, row.prompt_index, row.sample_index)
        return DecodeBatch(tokens, mask, temperature, top_p, top_k, max_new, stop_ids, seeds)

    def _completions(self, rows: list[_Row], toks, lps, num, stopped) -> list[Completion]:
        """The chunk's host-side outputs as ``Completion`` records, stamped with the version."""
        comps = []
        for r in range(len(rows)):
            ids = tuple(int(t) for t in toks[r, : num[r]])
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""
            comps.append(
                Completion(
                    token_ids=ids,
                    text=text,
                    logprobs=tuple(float(x) for x in lps[r, : num[r]]),
                    finish_reason="stop" if stopped[r] else "length",
                    weights_version=self.counters.weights_version,
                )
            )
        return comps

    def _batch_sharding(self, ndim: int) -> NamedSharding:
        assert self.mesh is not None  # called only for a sampler with a mesh
        axes = self._batch_axes or None
        return NamedSharding(self.mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


@functools.partial(jax.jit, static_argnames=("program", "batch_sharding"))
def _generate_jit(params, batch: DecodeBatch, *, program: DecodeProgram, batch_sharding):
    # Module-level so samplers of the same model config share compiled programs; the batch
    # sharding (a hashable NamedSharding over [B, N]) keeps the outputs split over the
    # data-parallel axes. Params stay an argument: new weights never retrace.
    def batch_spec(ndim):
        return NamedSharding(
            batch_sharding.mesh, PartitionSpec(batch_sharding.spec[0], *([None] * (ndim - 1)))
        )

    return generate_tokens(
        params, batch, program, batch_spec=batch_spec if batch_sharding is not None else None
    )


_split_jit = jax.jit(split_layers)


def _local_rows(array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (the whole array on one
    process); replicas of the same rows on several local devices are read once."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    shards = {}
    for shard in array.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def _maybe_tokenizer(path):
    if not (
        os.path.isfile(os.path.join(path, "tokenizer.json"))
        or os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    ):
        return None
    from advgame_jax.tokenization import ChatTokenizer

    return ChatTokenizer.from_dir(path)
