"""launch/convert.py logic on a real tiny run: the exported defender gives the checkpoint's
logits in transformers (torch, an independent implementation); HF → Orbax params → HF is
exact; the attacker keeps its marker through every conversion and needs the flag."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from advgame_jax.evaluation import convert, targets
from advgame_jax.models import forward
from advgame_jax.sampling.servable import AttackerCheckpointError, check_servable
from advgame_jax.training.export import MARKER_FILE, is_controlled_artifact
from tests.eval_world import tiny_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def torch_logits(path, tokens):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


def tokens_for(vocab):
    return np.random.default_rng(0).integers(3, vocab, size=(2, 12)).astype(np.int64)


@pytest.mark.parametrize("which", ["ema", "trained"])
def test_exported_defender_logits_match_checkpoint(run, tmp_path, which):
    out = (
        run.defender_hf
        if which == "ema"
        else convert.checkpoint_to_hf(run.workdir, str(tmp_path / "d"), params="trained")
    )
    step_dir = targets.find_step_dir(run.workdir)
    hf = targets.resolve_base_hf_dir(step_dir, "defender")
    config, params = targets.restore_player_params(step_dir, "defender", which, hf)
    tokens = tokens_for(config.vocab_size)
    ours = np.asarray(forward(params, config, jnp.asarray(tokens), compute_dtype=jnp.float32))
    theirs = torch_logits(out, tokens)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    # The export is the checkpoint's params, not the initial model's.
    init = torch_logits(hf, tokens)
    assert np.abs(init - theirs).max() > 1e-3
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_hf_to_params_and_back_is_exact(run, tmp_path):
    params_dir = convert.hf_to_params(run.defender_hf, str(tmp_path / "p"))
    back = convert.params_to_hf(params_dir, str(tmp_path / "hf"))
    a = load_file(os.path.join(run.defender_hf, "model.safetensors"))
    b = load_file(os.path.join(back, "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    tokens = tokens_for(300)
    np.testing.assert_array_equal(torch_logits(back, tokens), torch_logits(run.defender_hf, tokens))
    # The Orbax params feed a sampler refresh directly.
    from advgame_jax.sampling.checkpoints import restore_params

    restored = restore_params(os.path.join(params_dir, "params"))
    assert jax.tree.structure(restored) is not None
    with pytest.raises(FileExistsError):
        convert.params_to_hf(params_dir, back)
    assert sorted(os.listdir(tmp_path)) == ["hf", "p"]  # nothing left aside


def test_attacker_marker_survives_every_conversion(run, tmp_path):
    with pytest.raises(targets.AttackerNotAllowed):
        convert.checkpoint_to_hf(run.workdir, str(tmp_path / "a"), player="attacker")
    assert not (tmp_path / "a").exists()
    hf = convert.checkpoint_to_hf(
        run.workdir, str(tmp_path / "a"), player="attacker", allow_attacker=True
    )
    assert is_controlled_artifact(hf)
    with pytest.raises(targets.AttackerNotAllowed):
        convert.hf_to_params(hf, str(tmp_path / "p"))
    p = convert.hf_to_params(hf, str(tmp_path / "p"), allow_attacker=True)
    assert os.path.isfile(os.path.join(p, MARKER_FILE))
    with pytest.raises(targets.AttackerNotAllowed):
        convert.params_to_hf(p, str(tmp_path / "hf2"))
    hf2 = convert.params_to_hf(p, str(tmp_path / "hf2"), allow_attacker=True)
    assert is_controlled_artifact(hf2) and os.path.isfile(os.path.join(hf2, MARKER_FILE))
    with pytest.raises(AttackerCheckpointError):
        check_servable(hf2, allow_attacker=False)
    with pytest.raises(targets.AttackerNotAllowed):
        targets.load_target(targets.TargetSpec(hf_dir=hf2))
