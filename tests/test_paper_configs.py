"""Every paper config (GAME_SPEC §3 runs and ablations) builds its full object graph with a tiny
stand-in model of its family, a scripted OpenAI-compatible judge on loopback and the real
WildJailbreak seeds, and runs one trainer step offline."""

import glob
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest

from advgame_jax.experiment.loop import GameRunner
from advgame_jax.models import ModelConfig, init_params, save_hf
from advgame_jax.tokenization import ChatTokenizer, build_tiny_tokenizer
from tests.fake_judge_server import FakeJudgeServer, marker_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = sorted(
    glob.glob(os.path.join(ROOT, "configs", "*_*.py"))
    + glob.glob(os.path.join(ROOT, "configs", "ablations", "*.py"))
)
PAPER = [p for p in PAPER if not p.endswith("__init__.py")]


def _stand_in(path, tok_dir, family):
    tok = ChatTokenizer.from_dir(tok_dir)
    common = dict(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        eos_token_id=tok.stop_token_ids[0],
        pad_token_id=tok.pad_id,
    )
    if family == "llama":
        cfg = ModelConfig(
            model_type="llama",
            rope_theta=500000.0,
            rope_type="llama3",
            rope_factor=8.0,
            rope_original_max_position=1024,
            tie_word_embeddings=False,
            **common,
        )
    else:
        cfg = ModelConfig(
            model_type="qwen2",
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            qkv_bias=True,
            **common,
        )
    params = init_params(cfg, jax.random.PRNGKey(1), std=0.2)
    # Make the stop token likely (its logit is a scaled sum of the normed hidden state), so
    # that some completions end before the length limit and reach the judge.
    eos_row = 6.0 * jnp.ones((cfg.hidden_size,)) / cfg.hidden_size**0.5
    if cfg.tie_word_embeddings:
        params["embed"] = params["embed"].at[cfg.eos_token_id].set(eos_row)
    else:
        params["lm_head"] = params["lm_head"].at[:, cfg.eos_token_id].set(eos_row)
    save_hf(path, cfg, params)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("stand_ins")
    tok_dir = build_tiny_tokenizer(str(root / "tok"))
    return {f: _stand_in(str(root / f), tok_dir, f) for f in ("llama", "qwen")}


def _load(path):
    spec = importlib.util.spec_from_file_location("paper_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture(scope="module")
def judge_server():
    # Serves every paper config's judge.model (the start-up check compares the names).
    with FakeJudgeServer(
        marker_script(), models=sorted({_load(p).judge.model for p in PAPER})
    ) as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=lambda p: os.path.relpath(p, ROOT))
def test_paper_config_runs_one_step(path, tmp_path, stand_ins, judge_server, wildjailbreak_dir):
    c = _load(path)
    family = "llama" if c.judge.model.startswith("Llama") else "qwen"
    c.workdir = str(tmp_path / "run")
    for role in ("attacker", "defender"):
        c[role].hf_path = stand_ins[family]
        c[role].sampler = "jax"  # vLLM runs in its own test (extra [vllm])
        c[role].placement = "jax"
    c.judge.endpoints = (judge_server.url,)
    c.data.train_harmful = str(wildjailbreak_dir / "valid_harmful_256.jsonl")
    c.data.train_benign = str(wildjailbreak_dir / "valid_benign_256.jsonl")
    c.data.valid_harmful = c.data.train_harmful
    c.data.valid_benign = c.data.train_benign
    # The four validation splits of the paper (the adversarial ones read the same files here).
    c.data.valid_adversarial_harmful = c.data.train_harmful
    c.data.valid_adversarial_benign = c.data.train_benign
    c.mesh.data, c.mesh.fsdp = 1, 1
    c.train.seeds_per_step = 2  # the paper's 32, scaled down
    c.train.num_steps = 1
    c.train.validate_every = 1
    c.validation.num_seeds = 2
    c.sampling.max_new_tokens = 8
    c.logging.progress_bar = False
    c.logging.tensorboard = False
    runner = GameRunner(c)
    hits = judge_server.hits  # after the judge's start-up probes
    runner.run()
    assert runner.step == 1
    with open(os.path.join(c.workdir, "metrics.jsonl")) as f:
        rec = [json.loads(line) for line in f]
    last = rec[-1]
    assert last["step"] == 1
    b = c.train.seeds_per_step
    for split in ("harmful", "benign"):
        assert last[f"{split}/x/slots"] == b * c.game.num_attacks
        assert last[f"{split}/y/slots"] == b * c.game.num_attacks * c.game.num_responses
    # Validation answered the seeds directly and asked the scripted endpoint for scores.
    for split in ("harmful", "benign", "adversarial_harmful", "adversarial_benign"):
        assert last[f"valid/{split}/y/slots"] == 2 * c.validation.num_responses, split
    assert judge_server.hits > hits
    assert os.path.isdir(os.path.join(c.workdir, "checkpoints", "1"))
