"""Hugging Face checkpoint import/export: ``config.json`` + safetensors ⇄ the param pytree.

Loading never holds two host copies of a checkpoint: every parameter is built with
``jax.make_array_from_callback``, whose callback reads (with ``safetensors.safe_open``
slices) only the block of the file that one device's shard needs, converts it to the target
dtype layer by layer into one preallocated buffer and hands it to JAX. Host memory at any
moment is therefore about one device shard of one stacked parameter, plus JAX's transfer
staging and one layer's tensor as stored in the file. Measured (H200, jax 0.11.2, a 2.12 GiB
bf16 checkpoint whose largest stacked param is 0.50 GiB, loaded to one GPU without
shardings): peak anonymous host memory 1.06 GiB above the baseline. Extrapolated to
Llama-3-8B in bf16 on one device: ≈ 2 × 3.5 GiB (``gate_proj``/``up_proj``); with
``shardings`` over n devices each callback builds only a 1/n-sized block.

Saving streams tensor by tensor (``hf_state_dict``) into safetensors files written by a small
header-first writer, so it never builds a dict of all tensors either.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can read BF16)
import numpy as np
from safetensors import safe_open

from advgame_jax.errors import UserError
from advgame_jax.models.config import ModelConfig
from advgame_jax.models.params import param_shapes_and_axes


class HFCheckpointError(UserError, ValueError):
    """An HF checkpoint directory whose index or safetensors files are missing or unreadable,
    or whose tensors do not match its ``config.json``."""


_ST_EXPECTED = "expected a safetensors file as written by transformers' save_pretrained"


def _safe_open(fn: str):
    """``safe_open(fn)``; a missing, truncated or corrupted file is one ``HFCheckpointError``."""
    try:
        return safe_open(fn, "np")
    except FileNotFoundError:
        raise HFCheckpointError(f"{fn}: file not found; {_ST_EXPECTED}") from None
    except Exception as err:  # SafetensorError (header/size/JSON faults), OSError
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise HFCheckpointError(
            f"{fn}: not a readable safetensors file ({reason}); {_ST_EXPECTED}"
        ) from None


# (our key, HF name pattern, layout kind). Kinds: same | T (2-D transpose) | heads_out
# ([n*hd, d] → [d, n, hd]) | heads_in ([d, n*hd] → [n, hd, d]) | heads_bias ([n*hd] → [n, hd]).
_LAYER_MAP = (
    ("attn_norm", "model.layers.{i}.input_layernorm.weight", "same"),
    ("q_proj", "model.layers.{i}.self_attn.q_proj.weight", "heads_out"),
    ("k_proj", "model.layers.{i}.self_attn.k_proj.weight", "heads_out"),
    ("v_proj", "model.layers.{i}.self_attn.v_proj.weight", "heads_out"),
    ("q_bias", "model.layers.{i}.self_attn.q_proj.bias", "heads_bias"),
    ("k_bias", "model.layers.{i}.self_attn.k_proj.bias", "heads_bias"),
    ("v_bias", "model.layers.{i}.self_attn.v_proj.bias", "heads_bias"),
    ("o_proj", "model.layers.{i}.self_attn.o_proj.weight", "heads_in"),
    ("mlp_norm", "model.layers.{i}.post_attention_layernorm.weight", "same"),
    ("gate_proj", "model.layers.{i}.mlp.gate_proj.weight", "T"),
    ("up_proj", "model.layers.{i}.mlp.up_proj.weight", "T"),
    ("down_proj", "model.layers.{i}.mlp.down_proj.weight", "T"),
)
_TOP_MAP = (
    ("embed", "model.embed_tokens.weight", "same"),
    ("final_norm", "model.norm.weight", "same"),
    ("lm_head", "lm_head.weight", "T"),
)
_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(jnp.bfloat16): "BF16",
}


def _hf_shape(kind: str, shape: tuple) -> tuple:
    """HF (torch) shape of one per-layer tensor whose shape in our layout is ``shape``."""
    if kind == "same":
        return shape
    if kind == "T":
        return shape[::-1]
    if kind == "heads_out":
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_in":
        return (shape[2], shape[0] * shape[1])
    return (shape[0] * shape[1],)  # heads_bias


def _to_hf(kind: str, a: np.ndarray) -> np.ndarray:
    """Our per-layer layout → HF layout (contiguous)."""
    if kind == "T":
        a = a.T
    elif kind == "heads_out":
        a = a.reshape(a.shape[0], -1).T
    elif kind == "heads_in":
        a = a.reshape(-1, a.shape[2]).T
    elif kind == "heads_bias":
        a = a.reshape(-1)
    return np.ascontiguousarray(a)


def _read_block(kind: str, tensor, shape: tuple, idx: tuple) -> np.ndarray:
    """Read block ``idx`` (slices in our per-layer layout of ``shape``) from an HF tensor slice."""
    rng = [s.indices(n)[:2] for s, n in zip(idx, shape, strict=True)]
    sl = [slice(a, b) for a, b in rng]
    if kind == "same":
        return tensor[tuple(sl)]
    if kind == "T":
        return tensor[sl[1], sl[0]].T
    if kind == "heads_bias":
        (n0, n1), hd = rng[0], shape[1]
        return tensor[n0 * hd : n1 * hd].reshape(n1 - n0, hd)[:, sl[1]]
    if kind == "heads_out":  # ours [d, n, hd]; HF [n*hd, d]
        (n0, n1), hd = rng[1], shape[2]
        blk = tensor[n0 * hd : n1 * hd, sl[0]].reshape(n1 - n0, hd, -1)
        return blk[:, sl[2], :].transpose(2, 0, 1)
    # heads_in: ours [n, hd, d]; HF [d, n*hd]
    (n0, n1), hd = rng[0], shape[1]
    blk = tensor[sl[2], n0 * hd : n1 * hd].reshape(-1, n1 - n0, hd)
    return blk[:, :, sl[1]].transpose(1, 2, 0)


def _entries(
    config: ModelConfig,
) -> Iterator[tuple[tuple[str, ...], list[str], str, tuple[int, ...]]]:
    """Yield ``(path, hf_names, kind, full_shape)``; hf_names has one name per layer for
    stacked params (the leading axis) and a single name otherwise."""
    tree = param_shapes_and_axes(config)
    for key, pattern, kind in _TOP_MAP[:1]:
        yield (key,), [pattern], kind, tree[key][0]
    for key, pattern, kind in _LAYER_MAP:
        if key in tree["layers"]:
            names = [pattern.format(i=i) for i in range(config.num_layers)]
            yield ("layers", key), names, kind, tree["layers"][key][0]
    for key, pattern, kind in _TOP_MAP[1:]:
        if key in tree:
            yield (key,), [pattern], kind, tree[key][0]


def _tensor_files(path: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file holding it."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        from advgame_jax.data.readers import loads_json, read_text

        expected = 'expected {"weight_map": {tensor name: safetensors file name}}'
        d = loads_json(
            read_text(index, "a safetensors index", HFCheckpointError),
            index,
            expected,
            HFCheckpointError,
        )
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(fn, str) for fn in weight_map.values()
        ):
            raise HFCheckpointError(f"{index}: no 'weight_map' object of file names; {expected}")
        return {name: os.path.join(path, fn) for name, fn in weight_map.items()}
    if os.path.isfile(single):
        with _safe_open(single) as f:
            return {name: single for name in f.keys()}
    raise HFCheckpointError(
        f"{path}: neither model.safetensors nor model.safetensors.index.json "
        "found; expected an HF model directory"
    )


def _ignorable(name: str, config: ModelConfig) -> bool:
    # Tied checkpoints sometimes still carry lm_head; old ones carry RoPE buffers.
    return (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith(
        "rotary_emb.inv_freq"
    )


def load_hf(path, dtype=jnp.float32, *, shardings=None):
    """Read an HF checkpoint directory → ``(ModelConfig, params)``.

    ``dtype``: storage dtype of every param. ``shardings``: optional pytree of
    ``jax.sharding.Sharding`` matching the params (e.g. ``param_shardings(config, mesh)``);
    each device then reads only its own slice. Without it params land on the default device.
    Raises one ``HFCheckpointError`` (a ``UserError``) naming the file (and tensor) for a
    missing, truncated or corrupted safetensors file or index, and for a missing, unexpected
    or wrongly shaped tensor.
    """
    path = os.fspath(path)
    config = ModelConfig.from_hf_file(path)
    files = _tensor_files(path)
    handle = _HandleCache()
    entries = list(_entries(config))
    _check_tensors(path, config, files, entries, handle)
    np_dtype = np.dtype(jnp.dtype(dtype))
    params: dict = {"layers": {}}
    for entry in entries:
        p = entry[0]
        sharding = _lookup(shardings, p) if shardings is not None else None
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        arr = _read_param(entry, files, handle, np_dtype, sharding)
        if entry[1][0].startswith("model.layers."):
            params["layers"][p[1]] = arr
        else:
            params[p[0]] = arr
    return config, params


class _HandleCache:
    """``handle(file name)``: one open safetensors handle per file, opened on first use."""

    def __init__(self):
        self._handles = {}

    def __call__(self, fn):
        if fn not in self._handles:
            if not os.path.isfile(fn):
                raise HFCheckpointError(
                    f"{fn}: safetensors file listed in the index does not exist"
                )
            self._handles[fn] = _safe_open(fn)
        return self._handles[fn]


def _check_tensors(path: str, config: ModelConfig, files: dict, entries: list, handle) -> None:
    """Every tensor the config needs is present with its HF shape, and no other is."""
    expected = {n for _, names, _, _ in entries for n in names}
    unexpected = sorted(n for n in files if n not in expected and not _ignorable(n, config))
    if unexpected:
        raise HFCheckpointError(
            f"{path}: unexpected tensor {unexpected[0]!r} in {files[unexpected[0]]} "
            f"({len(unexpected)} unexpected in all) for a {config.architecture}"
        )
    for _, names, kind, shape in entries:
        per = shape[1:] if names[0].startswith("model.layers.") else shape
        want = list(_hf_shape(kind, per))
        for n in names:
            if n not in files:
                raise HFCheckpointError(
                    f"{path}: missing tensor {n!r} (expected shape {want}) "
                    f"for a {config.architecture}"
                )
            got = handle(files[n]).get_slice(n).get_shape()
            if list(got) != want:
                raise HFCheckpointError(
                    f"{files[n]}: tensor {n!r} has shape {list(got)}, "
                    f"expected {want} from config.json"
                )


def _read_param(entry, files: dict, handle, np_dtype, sharding):
    """One param as a ``jax.Array`` under ``sharding``, each device reading only its slice
    (a stacked layer param from its per-layer tensors)."""
    _, names, kind, shape = entry
    stacked = names[0].startswith("model.layers.")

    def callback(index):
        if not stacked:
            t = handle(files[names[0]]).get_slice(names[0])
            return _read_block(kind, t, shape, index).astype(np_dtype)
        lo, hi = index[0].indices(shape[0])[:2]
        sub = tuple(s.indices(n) for s, n in zip(index[1:], shape[1:], strict=True))
        out = np.empty((hi - lo,) + tuple(b - a for a, b, _ in sub), np_dtype)
        for j, i in enumerate(range(lo, hi)):
            t = handle(files[names[i]]).get_slice(names[i])
            out[j] = _read_block(kind, t, shape[1:], index[1:])
        return out

    return jax.make_array_from_callback(shape, sharding, callback)


def _lookup(tree, p):
    for k in p:
        tree = tree[k]
    return tree


def hf_state_dict(config: ModelConfig, params) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, numpy array)`` in HF names and torch layout, one tensor at a time.

    Arrays keep the params' dtype (bf16 as ``ml_dtypes.bfloat16``). Only one layer of one
    parameter is copied to host per step, so this can stream a large model into a live engine.
    """
    for p, names, kind, _ in _entries(config):
        leaf = _lookup(params, p)
        if names[0].startswith("model.layers."):
            for i, n in enumerate(names):
                yield n, _to_hf(kind, np.asarray(jax.device_get(leaf[i])))
        else:
            yield names[0], _to_hf(kind, np.asarray(jax.device_get(leaf)))


def _hf_specs(config: ModelConfig, params):
    """``[(hf_name, shape, np dtype)]`` in the order ``hf_state_dict`` yields them."""
    specs = []
    for p, names, kind, shape in _entries(config):
        dt = np.dtype(_lookup(params, p).dtype)
        per = shape[1:] if names[0].startswith("model.layers.") else shape
        specs += [(n, _hf_shape(kind, per), dt) for n in names]
    return specs


def _write_safetensors(
    fn: str, specs, tensors: Iterator[tuple[str, np.ndarray]], metadata: Optional[dict] = None
):
    """Header-first safetensors writer: the header comes from ``specs``, data is streamed;
    ``metadata``: extra string fields of the header's ``__metadata__``."""
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for name, shape, dt in specs:
        if dt not in _ST_DTYPES:
            raise ValueError(f"{name}: cannot save dtype {dt} (float32/float16/bfloat16 only)")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {
            "dtype": _ST_DTYPES[dt],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(fn, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        # strict=False: ``tensors`` may be one iterator shared by every shard, each taking
        # its own len(specs) items from it (the name/shape assert checks the pairing).
        for (name, shape, dt), (got_name, arr) in zip(specs, tensors, strict=False):
            assert got_name == name and arr.shape == tuple(shape), (name, got_name)
            f.write(np.ascontiguousarray(arr, dtype=dt).tobytes())


def save_hf(
    path,
    config: ModelConfig,
    params,
    *,
    max_shard_size: int = 5 * 2**30,
    metadata: Optional[dict] = None,
):
    """Write ``config.json``, ``generation_config.json`` (when bos/eos ids are known) and
    ``model.safetensors`` (or numbered shards + ``model.safetensors.index.json`` when larger
    than ``max_shard_size`` bytes) loadable by ``transformers`` and vLLM. ``metadata``:
    string fields added to every safetensors header (e.g. the attacker marker)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = config.to_hf_dict()
    dt = np.dtype(params["embed"].dtype)
    cfg["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[
        _ST_DTYPES.get(dt, "F32")
    ]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if config.eos_token_id is not None or config.bos_token_id is not None:
        gen = {
            k: cfg[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if cfg[k] is not None
        }
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)

    specs = _hf_specs(config, params)
    shards, cur, size = [], [], 0
    for s in specs:
        nbytes = int(np.prod(s[1], dtype=np.int64)) * s[2].itemsize
        if cur and size + nbytes > max_shard_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += nbytes
    shards.append(cur)
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    tensors = hf_state_dict(config, params)
    if len(shards) == 1:
        _write_safetensors(os.path.join(path, "model.safetensors"), specs, tensors, metadata)
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(path, fn), shard, tensors, metadata)
        for name, shape, dt in shard:
            weight_map[name] = fn
            total += int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
