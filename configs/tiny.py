"""The offline default: the whole AdvGame loop on a CPU in minutes, no downloads.

Tiny Llama-family attacker and defender (~0.2M params) with a toy initial behaviour, a tiny
byte-level BPE tokenizer, the shipped harmless toy seeds, and the lexicon rule judge
(see advgame_jax/experiment/toy_world.py). IPO-MD-style mirror descent: both players sample
from their EMA copies, which are also the loss reference.

    python launch/train.py --config=configs/tiny.py
    python launch/train.py --config=configs/tiny.py --config.train.num_steps=10
"""

from advgame_jax.experiment.configs.base import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.workdir = "runs/tiny"
    c.toy_world = True
    c.mesh.data = 1

    for p in (c.attacker, c.defender):
        p.param_dtype = "float32"
        p.compute_dtype = "float32"  # bf16 matmuls are slow on CPUs
        p.sampler_dtype = "float32"

    c.judge.backend = "rule"
    c.game.templates = "toy_v1"  # advgame_v1 with short attacker instructions
    c.game.attacker_format = "any"  # the tiny attacker writes x directly

    c.sampling.temperature = 1.0
    c.sampling.top_p = 1.0
    c.sampling.max_new_tokens = 40

    c.game.num_attacks = 4  # A×D = 4×2: more attacker contrast per seed than 2×2

    # DPO-MD with an NLL anchor on the chosen completion: without it the tiny attacker drifts
    # into unfaithful rewrites within ~10 steps (DPO lowers the shared copy tokens of near-
    # identical chosen/rejected attacks); measured in README's learning-curve table.
    c.loss.kind = "dpo"
    c.loss.nll_coef = 1.0
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.0
    c.train.num_steps = 60
    c.train.seeds_per_device = 8
    c.train.ema_decay = 0.8
    c.train.validate_every = 10
    c.train.checkpoint_every = 20
    c.train.logprob_chunk_size = 256
    # One shape per program, so nothing compiles after the first steps: updates hold ≤ 32
    # pairs (B·A defender pairs) of ≤ 128 tokens; the samplers pad to their largest batch
    # (attacker B·A = 32 rows, defender B·A·D = 64 rows) and to 64 prompt tokens.
    c.train.pair_buckets = (32,)
    c.train.length_buckets = (128,)
    c.attacker.sampler_min_batch_bucket = 32
    c.defender.sampler_min_batch_bucket = 64
    c.attacker.sampler_min_prompt_bucket = 64
    c.defender.sampler_min_prompt_bucket = 64
    c.train.remat_policy = "none"
    c.validation.num_seeds = 32
    c.validation.num_responses = 2
    return c
