"""HF checkpoint import/export: round trips through transformers, sharded checkpoints, and
one clear error per kind of bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from advgame_jax.models import ModelConfig, hf_state_dict, load_hf, save_hf
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen")
    make_tiny_qwen2(path)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _torch_logits(path, tokens, mask):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return (
            model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
            .logits.float()
            .numpy()
        )


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_save_hf_round_trip_through_transformers(which, llama_dir, qwen_dir, tmp_path):
    src = llama_dir if which == "llama" else qwen_dir
    config, params = load_hf(src)
    save_hf(tmp_path, config, params)
    assert sorted(os.listdir(tmp_path)) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    tokens = np.random.default_rng(0).integers(0, 256, (2, 9))
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    np.testing.assert_array_equal(
        _torch_logits(tmp_path, tokens, mask), _torch_logits(src, tokens, mask)
    )
    # same tensors, bit for bit, under the same names (tied: no lm_head written)
    ours, theirs = load_file(tmp_path / "model.safetensors"), load_file(src / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    with open(tmp_path / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == ([2, 3] if which == "qwen" else 2)


def test_sharded_index_checkpoint_equals_single_file(tmp_path):
    make_tiny_llama(tmp_path / "single", seed=3)
    make_tiny_llama(tmp_path / "sharded", seed=3, max_shard_size="40KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) >= 3
    c1, p1 = load_hf(tmp_path / "single")
    c2, p2 = load_hf(tmp_path / "sharded")
    assert c1 == c2
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_hf_shards_and_bf16(qwen_dir, tmp_path):
    config, params = load_hf(qwen_dir, dtype=jnp.bfloat16)
    save_hf(tmp_path, config, params, max_shard_size=30_000)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    config2, params2 = load_hf(tmp_path, dtype=jnp.bfloat16)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_hf_state_dict_matches_torch_state_dict(tmp_path):
    model = make_tiny_llama(tmp_path)
    config, params = load_hf(tmp_path)
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    got = dict(hf_state_dict(config, params))
    assert sorted(got) == sorted(ref)
    for name, arr in got.items():
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)


# ----------------------------------------------------------------------------- bad inputs
def _edit_config(path, **changes):
    with open(path / "config.json") as f:
        d = json.load(f)
    d.update(changes)
    with open(path / "config.json", "w") as f:
        json.dump(d, f)


def test_unsupported_model_type(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    _edit_config(path, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(ValueError, match=r"config\.json: unsupported model_type='mistral'"):
        load_hf(path)


@pytest.mark.parametrize(
    "changes, field",
    [
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_parameters.rope_type",
        ),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_llama_fields(llama_dir, tmp_path, changes, field):
    path = _copy(llama_dir, tmp_path / "m")
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=rf"config\.json: unsupported {field}="):
        load_hf(path)


def test_qwen_sliding_window_and_legacy_rope_scaling(tmp_path):
    base = dict(
        model_type="qwen2",
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(ValueError, match="x.json: unsupported use_sliding_window=True"):
        ModelConfig.from_hf_dict(dict(base, use_sliding_window=True), source="x.json")
    legacy = dict(
        base, model_type="llama", rope_theta=5e5, rope_scaling={"type": "dynamic", "factor": 2.0}
    )
    with pytest.raises(ValueError, match="unsupported rope_scaling.rope_type='dynamic'"):
        ModelConfig.from_hf_dict(legacy)
    legacy["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    c = ModelConfig.from_hf_dict(legacy)
    assert (c.rope_type, c.rope_theta, c.rope_original_max_position) == ("llama3", 5e5, 64)


def _rewrite_tensors(path, edit):
    fn = path / "model.safetensors"
    tensors = load_file(fn)
    edit(tensors)
    save_file(tensors, fn, metadata={"format": "pt"})


def test_missing_tensor(qwen_dir, tmp_path):
    path = _copy(qwen_dir, tmp_path / "m")
    _rewrite_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(
        ValueError,
        match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj"
        r"\.bias' \(expected shape \[32\]\)",
    ):
        load_hf(path)


def test_wrong_shape(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")

    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:100]

    _rewrite_tensors(path, edit)
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\."
        r"up_proj\.weight' has shape \[100, 64\], expected "
        r"\[128, 64\]",
    ):
        load_hf(path)


def test_unexpected_tensor(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    _rewrite_tensors(
        path, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)})
    )
    with pytest.raises(
        ValueError,
        match=r"unexpected tensor 'model\.layers\.0\.self_attn\."
        r"o_proj\.bias' in .*model\.safetensors",
    ):
        load_hf(path)


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        load_hf(tmp_path)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(ModelConfig("llama", 8, 8, 8, 1, 2, 1, 4).to_hf_dict(), f)
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        load_hf(tmp_path)
