"""launch/plan.py refuses every bad input with one ``error:`` line and exit 2, before JAX
starts (issue 17, items 12, 15 and 16): absurd or zero device counts, zero sequence, negative
or NaN memory and reserve, a missing config or model file, an unwritable ``--json`` path and
the tiny config without ``--attacker_model``; the space form ``--devices 16`` is honoured."""

import json
import pathlib
import resource
import subprocess
import sys
import time

import pytest

from advgame_jax.plan_inputs import (
    MAX_DEVICES,
    PlanInputError,
    check_flags,
    model_path_for,
    resolve_mesh_shape,
)
from advgame_jax.settings import MeshSettings

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


def _limit_memory():
    # 1 GiB of address space: enough for flag checks, far too little for JAX and its devices.
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _plan(*args, timeout=120, small=False):
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "plan.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        preexec_fn=_limit_memory if small else None,
    )
    return out, time.perf_counter() - t0


def _one_error_line(out):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    (d / "config.json").write_text(json.dumps(TINY_MODEL))
    return d


LLAMA = "--config=configs/llama_ipo_md.py"


@pytest.mark.parametrize(
    "args, expected",
    [
        ((LLAMA, "--devices=100000"), "--devices=100000: at most 1024 devices"),
        ((LLAMA, "--devices=0"), "--devices=0: expected at least 1"),
        ((LLAMA, "--devices=-4"), "--devices=-4: expected at least 1"),
        ((LLAMA, "--seq_len=0"), "--seq_len=0: expected 1"),
        (
            (LLAMA, "--device_memory_gib=-99"),
            "--device_memory_gib=-99.0: expected a finite number > 0",
        ),
        ((LLAMA, "--device_memory_gib=nan"), "--device_memory_gib=nan: expected a finite number"),
        ((LLAMA, "--reserve_gib=-1"), "--reserve_gib=-1.0: expected a finite number ≥ 0"),
        ((LLAMA, "--reserve_gib=nan"), "--reserve_gib=nan: expected a finite number"),
        ((LLAMA, "--reserve_gib=200"), "leaves nothing of the --device_memory_gib=131"),
        (
            (LLAMA, "--json=/nonexistent_dir/plan.json"),
            "--json=/nonexistent_dir/plan.json: directory",
        ),
        (
            (LLAMA, "--attacker_model=/nonexistent_model"),
            "--attacker_model=/nonexistent_model: no config.json there",
        ),
        (
            (LLAMA, "--config.mesh.fsdp=3", "--config.mesh.data=-1"),
            "config.mesh: 8 devices are not divisible by 3",
        ),
        ((LLAMA, "--config.mesh.nope=3"), "--config.mesh.nope: names a field the config does not"),
        ((LLAMA, "--devices=abc"), "--devices=abc"),
        (("--config=configs/nothere.py",), "--config: [Errno 2] No such file or directory"),
        (
            ("--config=configs/tiny.py",),
            "config.attacker.hf_path is empty and config 'tiny' names "
            "no family with a default shape",
        ),
    ],
)
def test_bad_input_is_one_error_line_before_jax(args, expected):
    # Refused before JAX starts, inside 1 GiB of address space (a 100,000-device request used
    # to take gigabytes before failing).
    out, seconds = _plan(*args, small=True)
    line = _one_error_line(out)
    assert expected in line, line
    assert seconds < 60, seconds


def test_json_path_is_checked_before_the_plan(tmp_path):
    (tmp_path / "a_dir").mkdir()
    out, _ = _plan(LLAMA, f"--json={tmp_path / 'a_dir'}")
    assert "is a directory" in _one_error_line(out)


def test_broken_model_file_names_it(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    out, _ = _plan(LLAMA, f"--defender_model={tmp_path}")
    line = _one_error_line(out)
    assert str(tmp_path / "config.json") in line and "not a readable JSON" in line
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY_MODEL, hidden_act="gelu")))
    out, _ = _plan(LLAMA, f"--defender_model={tmp_path}", "--devices=1")
    line = _one_error_line(out)  # found once JAX is imported, still before any compile
    assert "defender model" in line and "hidden_act" in line, line


def test_devices_space_form_is_honoured(tmp_path, tiny_model_dir):
    # Frozen players: the plan needs no compile, only the mesh of the asked devices.
    out, _ = _plan(
        "--config=configs/tiny.py",
        "--devices",
        "3",
        f"--attacker_model={tiny_model_dir}",
        f"--defender_model={tiny_model_dir}",
        "--config.attacker.trainable=False",
        "--config.defender.trainable=False",
        f"--json={tmp_path / 'plan.json'}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "plan tiny: 3 devices" in out.stdout, out.stdout
    assert json.loads((tmp_path / "plan.json").read_text())["devices"] == 3


def test_checks_as_functions(tmp_path):
    ok = check_flags(
        devices=16,
        device_memory_gib=131,
        seq_len=4096,
        reserve_gib=0,
        json_path=str(tmp_path / "p.json"),
    )
    assert ok["devices"] == 16 and ok["json_path"] == str(tmp_path / "p.json")
    for bad in (
        dict(devices=MAX_DEVICES + 1),
        dict(device_memory_gib=float("inf")),
        dict(reserve_gib=float("-inf")),
        dict(seq_len=-1),
    ):
        kw = dict(devices=8, device_memory_gib=131, seq_len=4096, reserve_gib=8) | bad
        with pytest.raises(PlanInputError):
            check_flags(**kw)
    assert resolve_mesh_shape(MeshSettings(data=1, fsdp=-1, tensor=2), 16) == (1, 8, 2)
    with pytest.raises(PlanInputError, match="at most one axis"):
        resolve_mesh_shape(MeshSettings(data=-1, fsdp=-1, tensor=1), 16)
    with pytest.raises(PlanInputError, match="≥ 1 or -1"):
        resolve_mesh_shape(MeshSettings(data=0, fsdp=1, tensor=1), 16)
    import importlib

    c = importlib.import_module("configs.llama_ipo_md").get_config()
    path = model_path_for("attacker", hf_path=c.attacker.hf_path, config_name=c.name)
    assert path.endswith("configs/models/llama3.1_8b/config.json")
