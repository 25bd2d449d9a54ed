"""Weight sync checkpoints: the trainer writes a player's sampling params as a versioned Orbax
checkpoint in the engine's dtype; an inference engine (in any process) reads it back.

Layout, under ``<workdir>/sync/<role>`` (an owned directory, see ``advgame_jax.fsutil``)::

    sync/<role>/v00000003/params/...        Orbax PyTree checkpoint, engine dtype
    sync/<role>/v00000003/COMMITTED.json    {"version": 3, "role": ..., "dtype": ...}

Writer (``write_sync_checkpoint``). The params are cast to the engine's dtype by one jitted
program whose output shardings are the input shardings, so each device casts only its own
shards and no array ever holds a full parameter on one device when the mesh has more than one
(``cast_for_sync``); Orbax then writes each shard from the process that holds it (on several
processes the build directory is shared and process 0 commits and renames it, with barriers;
untested here, single-host only on CPU). A version directory is built aside (``<name>.tmp-*``) and renamed into place, and ``COMMITTED.json`` is
its last file: a crash mid-write leaves at most an owned ``.tmp-*`` sibling (removed by the next
write) and never a directory a reader accepts. Old versions are removed (only owned ones)
once a newer one is committed, keeping ``keep`` of them. The attacker's sync directories are
marked as a controlled artifact (``CONTROLLED_ARTIFACT`` file, and every marker of
``advgame_jax.controlled`` in each version and its ``params/``; dirs 0700, files 0600).

Reader (``read_sync_checkpoint`` / ``hf_tensors``). Restores the committed params as host numpy
arrays (no accelerator needed) and yields them under Hugging Face names in torch layout, ready
for vLLM's ``reload_weights(weights_iterator=...)``. ``OrbaxWeightLoader`` is the vLLM worker
extension (``worker_extension_cls``) that does this inside every engine worker, so the same
call works for in-process, multi-process and tensor-parallel engines: each worker reads the
checkpoint itself (nothing crosses the engine's RPC but the path) and its parallel layers'
weight loaders keep that rank's slice.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

from advgame_jax import fsutil
from advgame_jax.errors import UserError

ROOT_KIND = "sync_root"
VERSION_KIND = "sync_checkpoint"
COMMIT_FILE = "COMMITTED.json"
CONTROLLED_FILE = "CONTROLLED_ARTIFACT"
_VERSION_RE = re.compile(r"^v(\d{8})$")
_CONTROLLED_NOTE = (
    "This directory holds weights of the trained attacker, a controlled "
    "red-teaming artifact. Do not copy, export or serve it without the "
    "project's explicit export flag.\n"
)


class SyncCheckpointError(UserError, ValueError):
    """A sync checkpoint is missing, uncommitted, or not what the reader expected."""


def version_dir(root: str, version: int) -> str:
    return os.path.join(root, f"v{int(version):08d}")


def committed_versions(root: str) -> list[int]:
    """Versions under ``root`` that carry a commit marker, ascending."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _VERSION_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, COMMIT_FILE)):
            out.append(int(m.group(1)))
    return sorted(out)


def cast_for_sync(params: Any, dtype) -> Any:
    """``params`` cast to ``dtype`` shard by shard: the outputs keep the inputs' shardings."""
    import jax

    def cast(tree):
        return jax.tree.map(lambda x: x.astype(dtype), tree)

    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(cast, out_shardings=shardings)(params)


def write_sync_checkpoint(
    root: str, params: Any, *, version: int, role: str, dtype, keep: int = 2
) -> str:
    """Write ``params`` (a sharded param pytree) as version ``version`` under ``root``.

    Returns the committed version directory (what an engine is told to load).
    """
    import jax
    import orbax.checkpoint as ocp

    if keep < 1:
        raise ValueError(f"write_sync_checkpoint: keep={keep}; expected >= 1")
    controlled = role == "attacker"
    if jax.process_index() == 0:
        fsutil.make_owned_dir(root, ROOT_KIND)
        if controlled:
            os.chmod(root, 0o700)
            if not os.path.isfile(os.path.join(root, CONTROLLED_FILE)):
                fsutil.atomic_write_text(os.path.join(root, CONTROLLED_FILE), _CONTROLLED_NOTE)
    cast = cast_for_sync(params, dtype)
    dtype_name = str(np.dtype(dtype)) if not hasattr(dtype, "dtype") else str(dtype.dtype)

    def build(tmp: str) -> None:
        if controlled and jax.process_index() == 0:
            os.chmod(tmp, 0o700)
            fsutil.atomic_write_text(os.path.join(tmp, CONTROLLED_FILE), _CONTROLLED_NOTE)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "params"), cast)
        ckptr.wait_until_finished()
        ckptr.close()
        if controlled and jax.process_index() == 0:  # advgame_jax.controlled: marker + modes
            from advgame_jax import controlled as gate

            gate.write_marker(tmp, params_subdir=True)
            gate.make_private(tmp)
        if jax.process_index() == 0:
            fsutil.atomic_write_text(
                os.path.join(tmp, COMMIT_FILE),
                json.dumps(
                    {
                        "version": int(version),
                        "role": role,
                        "dtype": dtype_name,
                        "controlled_artifact": controlled,
                    }
                )
                + "\n",
                mode=0o600 if controlled else 0o644,
            )

    if jax.process_count() == 1:
        final = fsutil.build_dir_atomically(version_dir(root, version), VERSION_KIND, build)
    else:
        final = _build_multihost(version_dir(root, version), build)
    if jax.process_index() == 0:
        for v in committed_versions(root)[:-keep]:
            if v != version:
                fsutil.remove_owned(version_dir(root, v), VERSION_KIND)
    return final


def _build_multihost(final: str, build) -> str:
    """``build_dir_atomically`` for several processes writing one Orbax checkpoint: a shared,
    deterministic build directory (Orbax needs the same path everywhere), made and renamed
    into place by process 0 only, with barriers around the collective write. Needs a
    filesystem every process sees."""
    import shutil

    from jax.experimental import multihost_utils

    tmp = f"{final}.tmp-build"
    if jax_process_index() == 0:
        if os.path.lexists(final) and not fsutil.is_owned(final, VERSION_KIND):
            raise fsutil.NotOwnedError(
                f"refusing to replace {final!r}: not an owned sync checkpoint"
            )
        if fsutil.is_owned(tmp, VERSION_KIND):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        fsutil.write_marker(tmp, VERSION_KIND)
    multihost_utils.sync_global_devices(f"advgame sync build {final}")
    build(tmp)  # Orbax writes every process's shards; process 0 writes the commit marker
    multihost_utils.sync_global_devices(f"advgame sync built {final}")
    if jax_process_index() == 0:
        if os.path.lexists(final):
            fsutil.remove_owned(final, VERSION_KIND)
        os.rename(tmp, final)
    multihost_utils.sync_global_devices(f"advgame sync renamed {final}")
    return final


def jax_process_index() -> int:
    import jax

    return jax.process_index()


def read_commit(path: str) -> dict:
    """The commit record of a version directory; ``SyncCheckpointError`` if uncommitted."""
    f = os.path.join(path, COMMIT_FILE)
    try:
        with open(f, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:
        raise SyncCheckpointError(
            f"sync checkpoint {path!r} is not committed ({COMMIT_FILE} missing or unreadable: "
            f"{e}); a writer may have crashed mid-write, refusing to load it"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("version"), int):
        raise SyncCheckpointError(f"{f}: expected a JSON object with an integer 'version'")
    return meta


def read_sync_checkpoint(path: str) -> tuple[int, Any]:
    """``(version, params)`` of a committed version directory, params as host numpy arrays."""
    import orbax.checkpoint as ocp

    meta = read_commit(path)
    item = os.path.join(path, "params")
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(item)
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    import jax

    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    params = ckptr.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return meta["version"], params


def _to_torch(a: np.ndarray):
    import torch

    if a.dtype.name == "bfloat16":  # ml_dtypes bfloat16: reinterpret the bits
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def hf_tensors(model_config, params) -> Iterator[tuple[str, Any]]:
    """``(hf_name, torch.Tensor)`` for every tensor of ``params``, one at a time."""
    from advgame_jax.models import hf_state_dict

    for name, array in hf_state_dict(model_config, params):
        yield name, _to_torch(np.array(array))


class OrbaxWeightLoader:
    """vLLM worker extension (``--worker-extension-cls`` / ``worker_extension_cls``).

    ``collective_rpc("advgame_load_sync", args=(path, model_config_json))`` makes every worker
    read the committed sync checkpoint at ``path`` and swap it in with vLLM's layer-wise
    in-place reload (which re-applies the backend's weight processing, e.g. the CPU
    backend's GEMM repacking). Returns the version.

    Tied embeddings: vLLM's llama loader skips ``lm_head.*`` for a tied model and its
    layer-wise reload processes a tied parameter only for its first owner (the embedding),
    so the output head would keep its old processed copy (``ParallelLMHead: Failed to load
    weights``; on CPU the head's packed GEMM weights stay stale). Here the head is given the
    new embedding through its own weight loader inside the same reload, so it is processed
    like every other layer and follows the embedding.
    """

    if TYPE_CHECKING:  # supplied by the vLLM worker class this extension is mixed into
        model_runner: Any
        vllm_config: Any

        def reload_weights(self, *args: Any, **kwargs: Any) -> None: ...

    def advgame_load_sync(self, path: str, model_config_json: str) -> int:
        from advgame_jax.models import ModelConfig

        cfg = ModelConfig.from_hf_dict(json.loads(model_config_json), source=path)
        version, params = read_sync_checkpoint(path)
        if not cfg.tie_word_embeddings:
            self.reload_weights(weights_iterator=hf_tensors(cfg, params))
        else:
            self._reload_tied(hf_tensors(cfg, params))
        return version

    def _reload_tied(self, weights) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        embedding = []

        def keep_embedding(it):
            for name, tensor in it:
                if name == "model.embed_tokens.weight":
                    embedding.append(tensor)
                yield name, tensor

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)
            model.load_weights(keep_embedding(weights))
            if head is not None and hasattr(head, "weight") and embedding:
                loader = getattr(head.weight, "weight_loader", default_weight_loader)
                loader(head.weight, embedding[0])
            finalize_layerwise_reload(model, self.vllm_config.model_config)


# What vLLM is given as its worker extension (in-process and in its own server alike).
EXTENSION = f"{OrbaxWeightLoader.__module__}.{OrbaxWeightLoader.__qualname__}"


def latest_committed(root: str) -> Optional[str]:
    """The newest committed version directory under ``root``, or None."""
    vs = committed_versions(root)
    return version_dir(root, vs[-1]) if vs else None
