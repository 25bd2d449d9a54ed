"""Sync checkpoints: written shard by shard in the engine's dtype (no full parameter on one
device on an 8-device FSDP mesh), versioned and committed, old versions removed only when
owned, a crashed write never readable, the attacker's marked as a controlled artifact."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from advgame_jax import fsutil
from advgame_jax.models import ModelConfig, hf_state_dict, init_params, make_mesh, param_shardings
from advgame_jax.sampling import weight_sync as ws

CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=32,
)


def _sharded_params(seed=0):
    mesh = make_mesh(fsdp=8)
    shardings = param_shardings(CONFIG, mesh)
    params = jax.device_put(init_params(CONFIG, jax.random.key(seed)), shardings)
    return mesh, params


def test_cast_keeps_shardings_and_never_holds_a_full_parameter_on_one_device():
    mesh, params = _sharded_params()
    cast = ws.cast_for_sync(params, jnp.bfloat16)
    n_split = 0
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(cast)):
        assert y.dtype == jnp.bfloat16
        assert y.sharding.is_equivalent_to(x.sharding, x.ndim), path
        if not x.sharding.is_fully_replicated:
            n_split += 1
            for shard in y.addressable_shards:  # every device holds strictly less than all
                assert shard.data.size < y.size, (path, shard.device)
    assert n_split >= 5  # embeddings, attention and MLP weights are FSDP-split
    ref = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(cast)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_versions_commit_cleanup_and_hf_tensors(tmp_path):
    _, params = _sharded_params(1)
    root = str(tmp_path / "sync" / "defender")
    paths = [
        ws.write_sync_checkpoint(
            root, params, version=v, role="defender", dtype=jnp.float32, keep=2
        )
        for v in (1, 2, 3)
    ]
    assert ws.committed_versions(root) == [2, 3]
    assert not os.path.exists(paths[0])
    assert ws.latest_committed(root) == paths[2]
    assert json.load(open(os.path.join(paths[2], ws.COMMIT_FILE)))["version"] == 3
    version, restored = ws.read_sync_checkpoint(paths[2])
    assert version == 3
    got = dict(ws.hf_tensors(CONFIG, restored))
    want = dict(hf_state_dict(CONFIG, params))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k].numpy(), np.asarray(want[k]))
    assert not os.path.exists(os.path.join(root, ws.CONTROLLED_FILE))


def test_bfloat16_reaches_torch_bit_exact(tmp_path):
    _, params = _sharded_params(2)
    path = ws.write_sync_checkpoint(
        str(tmp_path / "s"), params, version=0, role="defender", dtype=jnp.bfloat16
    )
    _, restored = ws.read_sync_checkpoint(path)
    name, t = next(ws.hf_tensors(CONFIG, restored))
    ref = dict(hf_state_dict(CONFIG, params))[name].astype(ml_dtypes.bfloat16)
    import torch

    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), ref.astype(np.float32))


def test_crash_mid_write_is_never_loaded_and_is_cleaned_next_time(tmp_path, monkeypatch):
    _, params = _sharded_params(3)
    root = str(tmp_path / "sync" / "attacker")
    good = ws.write_sync_checkpoint(root, params, version=1, role="attacker", dtype=jnp.float32)

    real = fsutil.atomic_write_text

    def crash(path, text, **kw):
        if path.endswith(ws.COMMIT_FILE):
            raise KeyboardInterrupt("killed mid-write")
        return real(path, text, **kw)

    monkeypatch.setattr(fsutil, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        ws.write_sync_checkpoint(root, params, version=2, role="attacker", dtype=jnp.float32)
    monkeypatch.undo()
    assert ws.committed_versions(root) == [1] and ws.latest_committed(root) == good
    # A half-written directory (as left by kill -9 before the rename) is refused by readers.
    half = ws.version_dir(root, 5)
    os.makedirs(os.path.join(half, "params"))
    with pytest.raises(ws.SyncCheckpointError, match="not committed"):
        ws.read_sync_checkpoint(half)
    # The attacker's weights are marked as a controlled artifact, private to the user.
    assert os.path.isfile(os.path.join(root, ws.CONTROLLED_FILE))
    assert os.path.isfile(os.path.join(good, ws.CONTROLLED_FILE))
    assert os.stat(root).st_mode & 0o077 == 0


def test_refuses_a_root_it_did_not_create(tmp_path):
    _, params = _sharded_params(4)
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    with pytest.raises(fsutil.NotOwnedError):
        ws.write_sync_checkpoint(
            str(user_dir), params, version=1, role="defender", dtype=jnp.float32
        )
    assert (user_dir / "notes.txt").read_text() == "keep me"
