"""The attacker gate (advgame_jax/controlled.py, issue 17 items 6 and 8): every route to the
trained attacker's weights (game checkpoint, sampler sync version, HF export, converted params
dir, renamed or edited copies) is refused without --allow_attacker by every tool (convert,
serve, eval/red-team targets), and every file holding attacker weights is 0600 in 0700
directories although the umask is 022."""

import json
import os
import shutil
import stat

import jax
import pytest

from advgame_jax import controlled
from advgame_jax.evaluation import convert, targets
from advgame_jax.models import ModelConfig, init_params, load_hf
from advgame_jax.sampling import weight_sync as ws
from advgame_jax.sampling.servable import (
    AttackerCheckpointError,
    check_servable,
    make_tiny_model_dir,
)
from advgame_jax.training.export import export_hf


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _weight_files(path):
    out = []
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".safetensors") or os.sep + "params" in root + os.sep:
                out.append(os.path.join(root, f))
    return out


def assert_private(path):
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path
    files = _weight_files(path)
    assert files, path
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, (root, d)
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f


def assert_refused_everywhere(path, *, hf: bool):
    """convert (the mode that reads this kind of dir), serve and eval targets all refuse."""
    with pytest.raises(controlled.AttackerNotAllowed, match="allow_attacker"):
        controlled.require_attacker_allowed(path, False, "--x")
    if hf:
        with pytest.raises(targets.AttackerNotAllowed):
            convert.hf_to_params(path, path + ".out")
        with pytest.raises(AttackerCheckpointError, match="allow_attacker"):
            check_servable(path, allow_attacker=False)
        with pytest.raises(targets.AttackerNotAllowed):
            targets.load_target(targets.TargetSpec(hf_dir=path))
    else:
        with pytest.raises(targets.AttackerNotAllowed):
            convert.params_to_hf(path, path + ".out")
    assert not os.path.exists(path + ".out")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("base")))


def test_every_route_is_gated_and_private(tmp_path, base, umask_022):
    config, params = load_hf(base)
    assert not controlled.is_attacker_artifact(base)

    # 1. the attacker's sampler sync version, with the base config.json copied in (the
    #    route of issue 17 item 6)
    root = str(tmp_path / "sync" / "attacker")
    v = ws.write_sync_checkpoint(root, params, version=3, role="attacker", dtype="float32")
    assert_private(v)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    shutil.copy(os.path.join(base, "config.json"), v)
    assert_refused_everywhere(v, hf=False)
    # a copy of the version dir alone, without its COMMITTED.json and top marker file
    copy = str(tmp_path / "copied_version")
    shutil.copytree(v, copy)
    os.remove(os.path.join(copy, ws.COMMIT_FILE))
    os.remove(os.path.join(copy, controlled.MARKER_FILE))
    os.remove(os.path.join(copy, ws.CONTROLLED_FILE))
    assert_refused_everywhere(copy, hf=False)
    # allowed: the export carries every marker and is private
    exported = convert.params_to_hf(copy, str(tmp_path / "exp"), allow_attacker=True)
    assert_private(exported)
    assert_refused_everywhere(exported, hf=True)

    # 2. an HF export (training.export), then renamed and edited: marker file removed and the
    #    base model's config.json copied over it; the safetensors header still says it
    hf = export_hf(
        str(tmp_path / "att_hf"), config, params, attacker=True, allow_attacker_export=True
    )
    assert_private(hf)
    assert_refused_everywhere(hf, hf=True)
    renamed = str(tmp_path / "innocent_name")
    os.rename(hf, renamed)
    os.remove(os.path.join(renamed, controlled.MARKER_FILE))
    shutil.copy(os.path.join(base, "config.json"), os.path.join(renamed, "config.json"))
    assert "safetensors header" in controlled.attacker_evidence(renamed)
    assert_refused_everywhere(renamed, hf=True)

    # 3. converted params dir (hf_to_params), renamed, marker file and config field removed
    p = convert.hf_to_params(renamed, str(tmp_path / "params_dir"), allow_attacker=True)
    assert_private(p)
    moved = str(tmp_path / "other_params")
    os.rename(p, moved)
    os.remove(os.path.join(moved, controlled.MARKER_FILE))
    with open(os.path.join(moved, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop(controlled.CONFIG_FIELD)
    with open(os.path.join(moved, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert "params" in controlled.attacker_evidence(moved)
    assert_refused_everywhere(moved, hf=False)

    # the defender's sync dir and a defender export are not gated
    d = ws.write_sync_checkpoint(
        str(tmp_path / "sync" / "defender"), params, version=1, role="defender", dtype="float32"
    )
    shutil.copy(os.path.join(base, "config.json"), d)
    assert not controlled.is_attacker_artifact(d)
    plain = convert.params_to_hf(d, str(tmp_path / "def_hf"))
    check_servable(plain, allow_attacker=False)
    assert stat.S_IMODE(os.stat(plain).st_mode) == 0o755


def test_gate_reads_only_markers_not_absent_paths(tmp_path):
    assert controlled.attacker_evidence(str(tmp_path / "missing")) is None
    (tmp_path / "config.json").write_text(json.dumps({"advgame_role": "attacker"}))
    assert controlled.is_attacker_artifact(str(tmp_path))
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
    )
    out = export_hf(str(tmp_path / "d"), cfg, init_params(cfg, jax.random.key(0)))
    assert not controlled.is_attacker_artifact(out)  # a defender export: no marker


@pytest.mark.slow
def test_game_checkpoint_attacker_needs_the_flag(tmp_path, umask_022, tmp_path_factory):
    from tests.eval_world import tiny_run

    run = tiny_run(tmp_path_factory)
    step_dir = targets.find_step_dir(run.workdir)
    for st in (os.stat(os.path.dirname(step_dir)), os.stat(step_dir)):
        assert stat.S_IMODE(st.st_mode) == 0o700
    with pytest.raises(targets.AttackerNotAllowed, match="allow_attacker"):
        convert.checkpoint_to_hf(run.workdir, str(tmp_path / "a"), player="attacker")
    with pytest.raises(targets.AttackerNotAllowed, match="allow_attacker"):
        targets.load_target(targets.TargetSpec(checkpoint=run.workdir, player="attacker"))
    assert not (tmp_path / "a").exists()
    out = convert.checkpoint_to_hf(
        run.workdir, str(tmp_path / "a"), player="attacker", allow_attacker=True
    )
    assert_private(out)
    assert_refused_everywhere(out, hf=True)
