"""Usage errors of the launch scripts: one ``error:`` line, exit status 2, no help dump and no
traceback (eval, convert, redteam, prepare_data, report, train); every numeric flag of
eval.py checked before any model loads; a corrupted safetensors file is one line; an eval
attempt that recorded nothing never blocks the corrected rerun in the same ``--out_dir``."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from advgame_jax.evaluation import runner
from advgame_jax.evaluation.classifiers import RuleClassifier
from advgame_jax.evaluation.prompt_sets import EvalExample, PromptSet
from advgame_jax.evaluation.targets import Decoding, Generation

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _launch(script, *args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error_line(proc, *parts):
    """Exit 2 and stderr's only line is ``error: …`` holding ``parts``."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


def _hf_dir_with_config(tmp_path):
    """An HF directory holding a hand-written Llama config.json."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": 256,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "rms_norm_eps": 1e-5,
                "max_position_embeddings": 8192,
                "tie_word_embeddings": True,
            }
        )
    )
    return d


@pytest.fixture
def seeds(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"prompt": "how do i bake bread", "category": "benign"}\n')
    return p


# ---- item 13: every numeric flag before any model loads ----------------------------------
@pytest.mark.parametrize(
    "flag,want",
    [
        ("--batch_size=0", "--batch_size=0: expected an integer >= 1"),
        ("--batch_size=-3", "--batch_size=-3: expected an integer >= 1"),
        ("--num_resamples=0", "--num_resamples=0: expected an integer in [1, 100000]"),
        (
            "--max_new_tokens=100000000",
            "--max_new_tokens=100000000: expected an integer below the "
            "model's max_position_embeddings (8192)",
        ),
        ("--top_p=0", "--top_p=0.0: expected a number in (0, 1]"),
        ("--limit=-1", "--limit=-1: expected an integer >= 0"),
    ],
)
def test_eval_numeric_flags_refused_before_the_model_loads(tmp_path, seeds, flag, want):
    hf = _hf_dir_with_config(tmp_path)  # config only: loading weights would fail loudly
    out = tmp_path / "out"
    proc = _launch(
        "eval.py", f"--hf_dir={hf}", f"--set=seeds:{seeds}", f"--out_dir={out}", flag, cwd=tmp_path
    )
    _one_error_line(proc, want)
    assert not out.exists()  # nothing written: the corrected rerun starts clean


def test_check_settings_in_process():
    ok = dict(batch_size=1, num_resamples=1, decoding=Decoding(), limit=0, max_positions=8192)
    runner.check_settings(**ok)
    for change, flag in [
        ({"batch_size": True}, "batch_size"),
        ({"decoding": Decoding(temperature=float("nan"))}, "temperature"),
        ({"decoding": Decoding(max_new_tokens=0)}, "max_new_tokens"),
        ({"decoding": Decoding(max_new_tokens=8192)}, "max_new_tokens"),
        ({"num_resamples": 10**9}, "num_resamples"),
    ]:
        with pytest.raises(runner.EvalSettingsError, match=f"--{flag}="):
            runner.check_settings(**{**ok, **change})


class _Target:
    """A scripted target: fails its first ``fail`` generate calls as an OOM would."""

    label = "scripted"

    def __init__(self, fail=0):
        self.fail, self.calls = fail, 0

    def generate(self, prompts, seeds, decoding):
        self.calls += 1
        if self.calls <= self.fail:
            raise MemoryError("RESOURCE_EXHAUSTED: out of memory allocating the KV cache")
        return [Generation("Sure, here is how: step one.", "stop", 7) for _ in prompts]


def _set():
    return [
        PromptSet(
            "s",
            "seeds",
            "-",
            (EvalExample("u1", "p1", "benign"), EvalExample("u2", "p2", "harmful")),
        )
    ]


def test_failed_attempt_with_no_results_does_not_block_the_corrected_rerun(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MemoryError):
        runner.run_eval(
            _set(),
            _Target(fail=1),
            RuleClassifier(),
            str(out),
            runner.EvalSettings(decoding=Decoding(max_new_tokens=10**6), num_resamples=10),
        )
    assert not (out / "run.json").exists()  # written with the first batch, not before
    # Before: run.json of the failed attempt refused this rerun ("other settings").
    res = runner.run_eval(
        _set(),
        _Target(),
        RuleClassifier(),
        str(out),
        runner.EvalSettings(decoding=Decoding(max_new_tokens=16), num_resamples=10),
    )
    assert res["s"]["num_examples"] == 2
    assert json.loads((out / "run.json").read_text())["decoding"]["max_new_tokens"] == 16
    # With results recorded, other settings are still refused.
    with pytest.raises(runner.RunMismatchError, match="other settings"):
        runner.run_eval(
            _set(),
            _Target(),
            RuleClassifier(),
            str(out),
            runner.EvalSettings(decoding=Decoding(max_new_tokens=32), num_resamples=10),
        )


# ---- item 20: usage errors of every script are one line ---------------------------------------
@pytest.mark.parametrize(
    "script,args,want",
    [
        ("eval.py", [], "--out_dir must have a value"),
        ("eval.py", ["--out_dir=o", "--batch_size=abc"], "--batch_size"),
        ("eval.py", ["--out_dir=o"], "give at least one --set"),
        ("convert.py", ["--mode=nope", "--out_dir=o"], "--mode"),
        (
            "convert.py",
            ["--mode=hf_to_params", "--out_dir=o", "--hf_dir=/nonexistent"],
            "--hf_dir '/nonexistent': expected a Hugging Face checkpoint directory",
        ),
        ("redteam.py", ["--out_dir=o", "--no_such_flag=1"], "no_such_flag"),
        ("redteam.py", ["--out_dir=o"], "--acknowledge_controlled_artifact"),
        (
            "redteam.py",
            ["--out_dir=o", "--acknowledge_controlled_artifact", "--num_attempts=0"],
            "--num_attempts=0: expected an integer >= 1",
        ),
        (
            "redteam.py",
            ["--out_dir=o", "--acknowledge_controlled_artifact", "--attacker_max_new_tokens=0"],
            "--attacker_max_new_tokens=0: expected",
        ),
        (
            "prepare_data.py",
            ["--tsv=/nonexistent.tsv", "--out_dir=o"],
            "/nonexistent.tsv: cannot be read: file not found",
        ),
        ("prepare_data.py", ["--out_dir=o"], "--tsv must have a value"),
        ("report.py", ["--out_dir=o", "--eval=/nonexistent.json"], "/nonexistent.json"),
    ],
)
def test_usage_errors_are_one_line_no_help_dump(tmp_path, script, args, want):
    _one_error_line(_launch(script, *args, cwd=tmp_path), want)


# ---- item 15: prepare_data tracebacks, corrupted safetensors -------------------------------------
def test_prepare_data_bad_tsv_and_bad_out_dir_are_one_line(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_bytes(
        b"vanilla\tadversarial\tcompletion\tdata_type\n"
        b'a\t\tc\tvanilla_harmful\n"b\t\tc\tvanilla_harmful\n'
    )
    _one_error_line(
        _launch("prepare_data.py", f"--tsv={tsv}", "--out_dir=o", cwd=tmp_path),
        f"{tsv}:3:",
        "not closed",
    )
    rows = "".join(f"v{i}\t\tc\tvanilla_{c}\n" for c in ("harmful", "benign") for i in range(3))
    tsv.write_text("vanilla\tadversarial\tcompletion\tdata_type\n" + rows)
    (tmp_path / "blocker").write_text("a file where the output directory should go")
    _one_error_line(
        _launch(
            "prepare_data.py",
            f"--tsv={tsv}",
            f"--out_dir={tmp_path}/blocker",
            "--valid_size=1",
            cwd=tmp_path,
        ),
        "cannot write the seed files",
    )
    _one_error_line(
        _launch("prepare_data.py", f"--tsv={tsv}", "--out_dir=o", "--valid_size=-1", cwd=tmp_path),
        "valid_size=-1",
    )


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_safetensors_is_one_line_in_eval_and_convert(tmp_path, seeds, damage):
    hf = _hf_dir_with_config(tmp_path)
    st = hf / "model.safetensors"
    if damage == "garbage":
        st.write_bytes(b"\x00\x01 not a safetensors file at all" * 10)
    else:  # a valid header whose data was cut off
        header = json.dumps(
            {"model.norm.weight": {"dtype": "F32", "shape": [4096], "data_offsets": [0, 16384]}}
        ).encode()
        st.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 100)
    want = f"{st}: not a readable safetensors file"
    _one_error_line(
        _launch(
            "convert.py",
            "--mode=hf_to_params",
            f"--hf_dir={hf}",
            f"--out_dir={tmp_path / 'p'}",
            cwd=tmp_path,
        ),
        want,
    )
    _one_error_line(
        _launch(
            "eval.py",
            f"--hf_dir={hf}",
            f"--set=seeds:{seeds}",
            f"--out_dir={tmp_path / 'o'}",
            cwd=tmp_path,
        ),
        want,
    )


# ---- item 14: a deeply nested JSON line through the entry points ---------------------------------
@pytest.mark.slow
def test_deeply_nested_seed_line_is_one_error_line_in_train_and_eval(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text(
        '{"prompt": "a", "category": "harmful"}\n'
        '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "category": "harmful"}\n'
    )
    proc = _launch(
        "train.py",
        f"--config={ROOT / 'configs' / 'tiny.py'}",
        f"--config.data.train_harmful={deep}",
        f"--config.workdir={tmp_path / 'w'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        proc.stderr.strip().splitlines()[-1].startswith(f"error: {deep}:2: JSON nested too deeply")
    )
    hf = _hf_dir_with_config(tmp_path)
    _one_error_line(
        _launch(
            "eval.py",
            f"--hf_dir={hf}",
            f"--set=seeds:{deep}",
            f"--out_dir={tmp_path / 'o'}",
            cwd=tmp_path,
        ),
        f"{deep}:2: JSON nested too deeply",
    )
