"""An export's config.json is the checkpoint's own model config (recorded in its metadata),
compared field by field with --base_hf_dir: same tensor shapes but another rms_norm_eps, rope
setting or max positions is refused naming the fields (issue 17 item 17)."""

import dataclasses
import json
import os
import shutil

import pytest

from advgame_jax.evaluation import convert, targets
from advgame_jax.models import ModelConfig
from tests.eval_world import tiny_run

BASE = ModelConfig(
    model_type="llama",
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
)


def test_differences_name_every_architecture_field():
    other = dataclasses.replace(
        BASE, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=1024, eos_token_id=3
    )
    diffs = targets.model_config_differences(BASE, other)
    assert [d.split(":")[0] for d in diffs] == [
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
    ]
    assert "1e-06 in the checkpoint, 1e-05 in --base_hf_dir" in diffs[0]
    assert targets.model_config_differences(BASE, BASE) == []


@pytest.mark.slow
def test_export_uses_the_checkpoint_config_and_refuses_another(tmp_path, tmp_path_factory):
    run = tiny_run(tmp_path_factory)
    step_dir = targets.find_step_dir(run.workdir)
    own = targets.checkpoint_model_config(step_dir, "defender")
    assert own is not None
    out = convert.checkpoint_to_hf(run.workdir, str(tmp_path / "ok"))
    assert ModelConfig.from_hf_file(os.path.join(out, "config.json")) == own

    hf = targets.resolve_base_hf_dir(step_dir, "defender")
    for field, value in (
        ("rms_norm_eps", 1e-3),
        ("rope_theta", 12345.0),
        ("max_position_embeddings", 77),
    ):
        wrong = tmp_path / f"wrong_{field}"
        shutil.copytree(hf, wrong)
        cfg = json.loads((wrong / "config.json").read_text())
        cfg[field] = value
        (wrong / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(
            targets.TargetError,
            match=rf"{field}: .* in the checkpoint, "
            rf"{value!r} in --base_hf_dir",
        ):
            convert.checkpoint_to_hf(run.workdir, str(tmp_path / f"x_{field}"), base=str(wrong))
        assert not (tmp_path / f"x_{field}").exists()


@pytest.mark.slow
def test_convert_and_eval_of_a_checkpoint_keep_orbax_off_the_console(tmp_path, tmp_path_factory):
    """Issue 17 item 22: no Orbax INFO lines and no _CHECKPOINT_METADATA warning."""
    import subprocess
    import sys

    from advgame_jax.data import packaged_seed_path

    run = tiny_run(tmp_path_factory)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo}
    for args in (
        [
            "convert.py",
            "--mode=checkpoint_to_hf",
            f"--checkpoint={run.workdir}",
            f"--out_dir={tmp_path / 'hf'}",
        ],
        [
            "eval.py",
            f"--checkpoint={run.workdir}",
            f"--out_dir={tmp_path / 'ev'}",
            f"--set=toy=seeds:{packaged_seed_path('toy_valid.jsonl')}",
            "--limit=2",
            "--max_new_tokens=4",
            "--num_resamples=10",
        ],
    ):
        proc = subprocess.run(
            [sys.executable, os.path.join(repo, "launch", args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "_CHECKPOINT_METADATA" not in proc.stderr, proc.stderr[-3000:]
        assert "orbax" not in proc.stderr.lower() and "checkpoint_manager" not in proc.stderr
