"""A prompt longer than a sampler's budget is the game's MAX_LENGTH error for its slot: an
empty completion with finish reason "length", counted, while the other prompts of the same
call get exactly what they would get alone (JAX sampler; the vLLM sampler's test is in
test_vllm_sampler.py)."""

import jax
import numpy as np

from advgame_jax.models import ModelConfig, init_params
from advgame_jax.sampling import SamplingParams
from advgame_jax.sampling.jax_sampler import JaxSampler


def test_over_budget_prompt_is_an_empty_length_completion_and_counted():
    config = ModelConfig(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=0,
    )
    sampler = JaxSampler(
        config, init_params(config, jax.random.key(0)), max_prompt_len=16, compute_dtype="float32"
    )
    rng = np.random.default_rng(0)
    short = [int(t) for t in rng.integers(2, 64, 5)]
    long = [int(t) for t in rng.integers(2, 64, 1 << 12)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=4, n=2, seed=3)
    got = sampler.generate([short, long, short], sp)
    alone = sampler.generate([short], sp)
    assert len(got) == 6 and sampler.stats()["prompt_too_long"] == 1
    assert [c.token_ids for c in got[2:4]] == [(), ()]
    assert all(c.finish_reason == "length" and c.text == "" and c.logprobs == () for c in got[2:4])
    assert [c.token_ids for c in got[:2]] == [c.token_ids for c in alone]
    assert all(len(c.token_ids) == 4 for c in got[:2] + got[4:])
