"""The game loop under faults: nothing the user owns is touched, bad places and seeds stop the
run before anything loads, a 1 MB seed is a counted MAX_LENGTH error (not a crash), a
checkpoint of another config is refused without damage, a torn metrics line does not stop a
rerun, validation records keep their training step's stage timings."""

import json
import os
import types

import pytest

from advgame_jax.data import packaged_seed_path, read_seeds_jsonl
from advgame_jax.experiment.loop import GameRunner
from advgame_jax.experiment.validate import ConfigError
from advgame_jax.training.checkpoint import CheckpointIncompatibleError
from tests.test_train_loop import read_metrics, tiny_config  # toy_dir: conftest fixture


def test_user_folders_and_unfit_seeds_stop_before_anything_is_touched(tmp_path):
    toy = str(tmp_path / "toy")
    # A workdir that cannot be a directory (under a regular file: root ignores chmod).
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    with pytest.raises(
        ConfigError, match=r"config\.workdir=.*a_file/run.* not a writable directory"
    ):
        GameRunner(tiny_config(blocker / "run", toy))
    assert blocker.read_text() == "not a directory\n"

    # A toy_dir holding the user's files is refused, not wiped.
    user = tmp_path / "my_files"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work\n")
    with pytest.raises(
        ConfigError, match=r"config\.toy_dir=.*my_files.* not created by advgame_jax"
    ):
        GameRunner(tiny_config(tmp_path / "w1", str(user)))
    assert (
        os.listdir(user) == ["thesis.txt"]
        and (user / "thesis.txt").read_text() == "years of work\n"
    )

    # Seeds the toy models cannot hold: a clear error, and nothing is left behind.
    long_seeds = tmp_path / "long.jsonl"
    long_seeds.write_text(
        json.dumps({"prompt": "open the vault " * 400, "category": "harmful"}) + "\n"
    )
    fresh = tmp_path / "toy_fresh"
    with pytest.raises(
        ConfigError,
        match=r"config\.toy_world: 1 of \d+ training seeds \(first: #\d+\) make warm-up",
    ):
        GameRunner(tiny_config(tmp_path / "w2", str(fresh), data__train_harmful=str(long_seeds)))
    assert not os.path.exists(fresh)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("toy_fresh")]
    for sub in ("w1", "w2"):
        assert not os.path.exists(tmp_path / sub / "checkpoints")


def _seed_files(tmp_path):
    """Harmful: 7 toy seeds + one of 1 MB (every batch of 8 holds it); benign: 8 toy seeds."""
    toy = read_seeds_jsonl(packaged_seed_path("toy_seeds.jsonl"))
    harmful = [s.prompt for s in toy if s.category == "harmful"][:7]
    benign = [s.prompt for s in toy if s.category == "benign"][:8]
    big = ("open the vault " * 70000)[: 1 << 20]
    files = {}
    for name, prompts, cat in (
        ("harmful", harmful + [big], "harmful"),
        ("benign", benign, "benign"),
    ):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "category": cat}) + "\n" for p in prompts))
        files[name] = str(path)
    return files


@pytest.mark.slow
def test_long_seed_changed_config_torn_metrics_and_timings(tmp_path, toy_dir, caplog):  # noqa: F811
    """The toy world's models loaded as real checkpoints (toy_world=False), so that the
    seed files are the user's, as in a real run."""
    files = _seed_files(tmp_path)
    kw = dict(
        toy_world=False,
        attacker__hf_path=os.path.join(toy_dir, "attacker"),
        defender__hf_path=os.path.join(toy_dir, "defender"),
        data__train_harmful=files["harmful"],
        data__train_benign=files["benign"],
        data__valid_harmful=packaged_seed_path("toy_valid.jsonl"),
        data__valid_benign=packaged_seed_path("toy_valid.jsonl"),
        train__num_steps=3,
        train__checkpoint_every=1,
        train__validate_every=2,
        validation__num_seeds=4,
    )
    workdir = tmp_path / "run"
    c = tiny_config(workdir, "", **kw)
    with caplog.at_level("WARNING"):
        runner = GameRunner(c)
    assert any(
        "1 of 8 training harmful seeds are longer than the attacker sampler's prompt "
        "budget" in r.getMessage()
        for r in caplog.records
    )
    runner.run(max_steps=2)  # stops after step 2, as a kill after its checkpoint would
    rec = {r["step"]: r for r in read_metrics(workdir)}
    assert sorted(rec) == [0, 1, 2]
    # The 1 MB seed: its attacks are MAX_LENGTH errors, counted; the run went on.
    assert (
        rec[1]["sys/attacker/prompt_too_long"] == 1 and rec[2]["sys/attacker/prompt_too_long"] == 2
    )
    assert rec[1]["harmful/x/rate/MAX_LENGTH"] >= 1 / 8
    # A validation step keeps the stage timings of its training step.
    for key in (
        "time/attacker_generation",
        "time/defender_generation",
        "time/judging",
        "time/update",
        "time/validation",
    ):
        assert rec[2].get(key, 0) > 0, key
    assert "valid/harmful/reward" in rec[2]

    # A kill mid-write leaves a torn last line.
    with open(workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "harmful/x/rew')
    metrics_before = (workdir / "metrics.jsonl").read_bytes()
    ckpts_before = sorted(os.listdir(workdir / "checkpoints"))

    # Resuming under another config: refused, fields named, nothing touched.
    changed = tiny_config(workdir, "", **dict(kw, loss__beta=0.2, optim__lr=2e-3))
    with pytest.raises(
        CheckpointIncompatibleError,
        match=r"config\.loss\.beta: 0\.1 in the checkpoint, 0\.2 now.*config\.optim\.lr",
    ):
        GameRunner(changed)
    assert sorted(os.listdir(workdir / "checkpoints")) == ckpts_before
    assert (workdir / "metrics.jsonl").read_bytes() == metrics_before

    # The original config resumes at step 2; the torn line is dropped, not fatal.
    again = GameRunner(c)
    assert again.step == 2
    again.run()
    assert [r["step"] for r in read_metrics(workdir)] == [0, 1, 2, 3]
    assert oct(os.stat(workdir / "metrics.jsonl").st_mode & 0o777) == "0o600"


def test_signal_message_names_the_step_being_finished(caplog):
    for in_step, want in ((True, "finishing step 4"), (False, "stopping after step 4")):
        fake = types.SimpleNamespace(_in_step=in_step, step=4, _stop_requested=False)
        with caplog.at_level("WARNING"):
            GameRunner._on_signal(fake, 15, None)
        assert fake._stop_requested and want in caplog.records[-1].getMessage()
