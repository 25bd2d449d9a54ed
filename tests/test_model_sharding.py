"""Params sharded over an 8-device CPU mesh (fsdp=2 × tensor=4): real sharding, same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from advgame_jax.models import (
    DEFAULT_RULES,
    ModelConfig,
    forward,
    load_hf,
    logical_sharding,
    make_mesh,
    param_logical_axes,
    param_shardings,
)
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) >= 8, "tests/conftest.py should provide 8 CPU devices"
    return make_mesh(data=1, fsdp=2, tensor=4)


def test_param_shardings_split_and_fall_back(llama, mesh):
    config, _ = load_hf(llama)
    sh = param_shardings(config, mesh)
    axes_tree = jax.tree.structure(
        param_logical_axes(config), is_leaf=lambda x: isinstance(x, tuple)
    )
    assert jax.tree.structure(sh) == axes_tree
    layers = sh["layers"]
    assert layers["gate_proj"].spec == P(None, "fsdp", "tensor")
    assert layers["down_proj"].spec == P(None, "tensor", "fsdp")
    assert layers["q_proj"].spec == P(None, "fsdp", "tensor", None)
    # 2 KV heads cannot be split 4 ways: that dim is replicated instead of crashing
    assert layers["k_proj"].spec == P(None, "fsdp", None, None)
    assert sh["embed"].spec == P("tensor", "fsdp")
    assert sh["final_norm"].spec == P(None)
    assert DEFAULT_RULES["mlp"] == "tensor"


def test_sharded_forward_equals_unsharded(llama, mesh):
    config, params = load_hf(llama)
    tokens = np.random.default_rng(0).integers(0, 256, (4, 10)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :4] = 0
    mask[2, 7:] = 0
    ref = np.asarray(forward(params, config, tokens, mask))

    sharded = jax.device_put(params, param_shardings(config, mesh))
    gate = sharded["layers"]["gate_proj"]
    assert {s.data.shape for s in gate.addressable_shards} == {(2, 32, 32)}
    assert len(gate.sharding.device_set) == 8
    batch_sh = logical_sharding(tokens.shape, ("batch", "seq"), mesh)
    assert batch_sh.spec == P("fsdp", None)
    fwd = jax.jit(forward, static_argnums=1)
    out = fwd(sharded, config, jax.device_put(tokens, batch_sh), jax.device_put(mask, batch_sh))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_load_hf_places_params_sharded(llama, mesh):
    config, params = load_hf(llama)
    shardings = param_shardings(config, mesh)
    _, sharded = load_hf(llama, dtype=jnp.bfloat16, shardings=shardings)
    for a, b, s in zip(
        jax.tree.leaves(params), jax.tree.leaves(sharded), jax.tree.leaves(shardings)
    ):
        assert b.dtype == jnp.bfloat16 and b.sharding == s
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
    up = sharded["layers"]["up_proj"]
    assert {s.data.shape for s in up.addressable_shards} == {(2, 32, 32)}
    assert {s.data.shape for s in sharded["embed"].addressable_shards} == {(64, 32)}


def test_tensor_axis_larger_than_heads_replicates(tmp_path):
    make_tiny_qwen2(tmp_path)  # 2 query heads, 1 KV head
    mesh = make_mesh(tensor=8)
    config = ModelConfig.from_hf_file(tmp_path)
    _, params = load_hf(tmp_path, shardings=param_shardings(config, mesh))
    assert params["layers"]["q_proj"].sharding.spec == P(None, None, None, None)
    assert params["layers"]["gate_proj"].sharding.spec == P(None, None, "tensor")
    assert params["layers"]["q_bias"].sharding.spec == P(None, None, None)
    out = jax.jit(forward, static_argnums=1)(params, config, jnp.ones((2, 3), jnp.int32))
    assert np.isfinite(np.asarray(out)).all()


def test_make_mesh_needs_enough_devices():
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(data=2, fsdp=2, tensor=4)
