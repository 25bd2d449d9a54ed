"""configs/smol.py with the real SmolLM2-135M-Instruct: the game yields pairs and finite losses
with the rule judge (one step, then a resumed second step), and a step with SmolLM2 as the
LLM judge served over the OpenAI API (launch/serve.py's server) runs and counts its judge
failures. Also: placement='jax' alone moves a vLLM paper config onto the JAX sampler."""

import importlib
import json
import math
import os

import pytest

from advgame_jax.experiment.loop import GameRunner
from advgame_jax.experiment.validate import validate_config
from advgame_jax.sampling.placement import placement_of
from tests import test_real_model

smol_dir = test_real_model.smol_dir  # the converted SmolLM2 directory (a fixture)
smol = importlib.import_module("configs.smol")
smol_llm_judge = importlib.import_module("configs.smol_llm_judge")
SPLITS, ROLES = ("harmful", "benign"), ("attacker", "defender")


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _config(module, workdir, model_dir, steps):
    c = module.get_config()
    c.workdir = str(workdir)
    c.attacker.hf_path = c.defender.hf_path = model_dir
    c.train.num_steps = steps
    c.train.checkpoint_every = 1
    return c


def _pairs(r):
    return sum(r.get(f"{s}/pairs/{role}", 0.0) for s in SPLITS for role in ROLES)


def test_placement_jax_alone_moves_a_vllm_config_to_the_jax_sampler():
    c = importlib.import_module("configs.qwen_dpo_md").get_config()
    assert "sampler" not in c.attacker  # one field says where a player samples
    assert c.attacker.placement == c.defender.placement == "offloaded"
    c.attacker.placement = c.defender.placement = "jax"
    from advgame_jax.experiment.validate import settings_from_config

    s = settings_from_config(c, complete=False)  # was: "placement='jax' contradicts sampler='vllm'"
    assert s.attacker.placement == s.defender.placement == "jax"
    assert placement_of(s, "attacker") == placement_of(s, "defender") == "jax"


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory, smol_dir):
    """Two steps of configs/smol.py: one, then a resumed second."""
    run = tmp_path_factory.mktemp("smol") / "run"
    validate_config(_config(smol, run, smol_dir, 2))
    # Each runner is closed before the next is built: two real-model runners' states at once
    # would double the process's memory.
    with GameRunner(_config(smol, run, smol_dir, 2)) as runner:
        runner.run(max_steps=1)
    with GameRunner(_config(smol, run, smol_dir, 2)) as runner:
        runner.run()  # resumes at step 1
    return run


@pytest.mark.slow
def test_smol_rule_judge_yields_pairs_and_resumes(smol_run):
    recs = [r for r in _records(smol_run) if "harmful/x/slots" in r]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert _pairs(r) > 0, r
        losses = [
            r[f"{s}/{role}/loss"] for s in SPLITS for role in ROLES if f"{s}/{role}/loss" in r
        ]
        assert losses and all(math.isfinite(v) for v in losses), losses
        assert any(v != 0.0 for v in losses)


@pytest.mark.slow
def test_smol_llm_judge_step_over_the_openai_api(tmp_path, smol_dir):
    from advgame_jax.sampling.openai_schema import Limits
    from advgame_jax.sampling.server import ServerConfig, serve_model_dir

    server = serve_model_dir(
        smol_dir,
        config=ServerConfig(
            port=0,
            model_name="smollm2",
            limits=Limits(max_prompt_tokens=1024, max_tokens=128, default_max_tokens=96, max_n=4),
        ),
        max_batch_size=16,
    )
    server.start()
    try:
        c = _config(smol_llm_judge, tmp_path / "llm", smol_dir, 1)
        c.judge.endpoints = (server.url + "/v1",)
        # One seed per split (the config's 2 doubles the judge's prompts, ~1,000 tokens each,
        # which dominate this step on a CPU); the shapes stay those of the rule-judge run
        # (the samplers' and updates' minimum buckets), so its programs are reused.
        c.train.seeds_per_device = 1
        with GameRunner(c) as runner:
            runner.run()
    finally:
        server.shutdown()
    (r,) = [r for r in _records(tmp_path / "llm") if "harmful/x/slots" in r]
    requests = sum(
        r[f"{s}/judge/{st}/requests"] for s in SPLITS for st in ("faith", "defender", "attacker")
    )
    failures = sum(
        r[f"{s}/judge/{st}/failures"] for s in SPLITS for st in ("faith", "defender", "attacker")
    )
    assert requests > 0 and 0 <= failures <= requests
    # The 135M judge's parse rate per judge stage (shown with `pytest -s`; README records it).
    for st in ("faith", "defender", "attacker"):
        n = sum(r[f"{s}/judge/{st}/requests"] for s in SPLITS)
        bad = sum(r[f"{s}/judge/{st}/failures"] for s in SPLITS)
        print(f"LLM judge {st}: {bad:.0f} of {n:.0f} requests failed")
    for key, v in r.items():
        if key.endswith("/loss"):
            assert math.isfinite(v), key


@pytest.mark.slow
def test_eval_on_real_seeds_and_export_of_the_trained_defender(
    smol_run, smol_dir, tmp_path, wildjailbreak_dir
):
    """Original and trained defender on 8 + 8 real seeds (rule classifier); the exported
    defender loads and generates in transformers and vLLM."""
    from advgame_jax.evaluation import classifiers, convert, prompt_sets, runner, targets

    sets = prompt_sets.load_prompt_sets(
        [
            f"harmful=seeds:{wildjailbreak_dir / 'valid_harmful_256.jsonl'}",
            f"benign=seeds:{wildjailbreak_dir / 'valid_benign_256.jsonl'}",
        ],
        limit=8,
    )
    decoding = targets.Decoding(max_new_tokens=48)
    exported = convert.checkpoint_to_hf(str(smol_run), str(tmp_path / "defender"))
    results = {}
    for name, hf_dir in (("original", smol_dir), ("trained", exported)):
        out = runner.run_eval(
            sets,
            targets.load_target(targets.TargetSpec(hf_dir=hf_dir)),
            classifiers.make_classifier("rule"),
            str(tmp_path / f"eval_{name}"),
            runner.EvalSettings(decoding=decoding, batch_size=16),
        )
        assert out["harmful"]["num_examples"] == out["benign"]["num_examples"] == 8
        assert out["harmful"]["asr_n"] + out["harmful"]["judge_failures"] == 8
        assert out["benign"]["over_refusal_n"] + out["benign"]["judge_failures"] == 8
        results[name] = out
        assert os.path.isfile(tmp_path / f"eval_{name}" / "eval.md")

    import torch
    from transformers import AutoModelForCausalLM

    from advgame_jax.tokenization import ChatTokenizer

    tok = ChatTokenizer.from_dir(exported)
    prompt = tok.render_user_turn("What is the capital of France?")
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():  # the mask is given: inferred from pad id 2 it would hide <|im_end|>
        hf_ids = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
        )[0]
    hf_ids = [int(t) for t in hf_ids[len(prompt) :]]
    assert len(hf_ids) > 0
    from tests.test_vllm_sampler import VLLM_MISSING

    if VLLM_MISSING:
        return
    from advgame_jax.sampling import SamplingParams
    from advgame_jax.sampling.vllm_sampler import VllmSampler

    with VllmSampler(
        exported,
        dtype="float32",
        kv_cache_memory_bytes=128 << 20,
        max_model_len=256,
        enforce_eager=True,
    ) as vllm:
        (out,) = vllm.generate(
            [prompt],
            SamplingParams(temperature=0.0, max_new_tokens=16, stop_token_ids=tok.stop_token_ids),
        )
    assert list(out.token_ids) == hf_ids[: len(out.token_ids)] and out.token_ids
