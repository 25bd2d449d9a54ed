"""The JAX sampler for pods: on an 8-device mesh with FSDP-sharded weights and rows split over
the batch axes it gives the same greedy tokens as one device (and as transformers); top-p /
top-k filtering never sorts the vocabulary and keeps exactly the set a full sort keeps
(numpy reference), on both its candidate path and its bisection fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advgame_jax.models import make_mesh
from advgame_jax.sampling import SamplingParams
from advgame_jax.sampling.decode import filter_cutoff, select_tokens
from advgame_jax.sampling.jax_sampler import JaxSampler
from tests.test_sampling_jax import _hf_greedy, _prompts
from tests.tiny_models import make_tiny_llama


def _numpy_kept(scaled, top_p, top_k):
    """Kept-token counts by the textbook rule: sort descending, keep the smallest prefix whose
    mass reaches top_p (crossing token included) and at most top_k, plus ties of the last."""
    counts = []
    for x, p_, k_ in zip(scaled.astype(np.float64), top_p, top_k):
        desc = np.sort(x)[::-1]
        p = np.exp(desc - desc.max())
        p /= p.sum()
        keep = (np.cumsum(p) - p) < p_
        if k_ > 0:
            keep &= np.arange(len(x)) < k_
        cutoff = desc[max(int(keep.sum()), 1) - 1]
        counts.append(int((x >= cutoff).sum()))
    return np.array(counts)


@pytest.mark.parametrize("max_candidates", [8, 64, 4096])
def test_filter_cutoff_matches_a_full_sort(max_candidates):
    rng = np.random.default_rng(max_candidates)
    v = 2000
    x = (rng.standard_normal((8, v)) * rng.uniform(0.5, 4, (8, 1))).astype(np.float32)
    x[1, :40] = np.sort(x[1])[-5]  # a block of ties around the cut
    x[2] = 0.0  # a flat distribution: the nucleus needs most of the vocabulary
    top_p = np.array([0.9, 0.5, 0.3, 0.99, 1.0, 0.7, 1.0, 0.95], np.float32)
    top_k = np.array([0, 0, 0, 0, 50, 5, 0, 1500], np.int32)
    cutoff = jax.jit(lambda a, b, c: filter_cutoff(a, b, c, max_candidates=max_candidates))(
        x, top_p, top_k
    )
    got = (x >= np.asarray(cutoff)[:, None]).sum(axis=1)
    np.testing.assert_array_equal(got, _numpy_kept(x, top_p, top_k))


def test_filtered_selection_does_not_sort_the_vocabulary():
    b, v = 4, 4096
    args = (
        jnp.zeros((b, v)),
        jnp.ones((b,)),
        jnp.full((b,), 0.9),
        jnp.zeros((b,), jnp.int32),
        jax.vmap(jax.random.key)(jnp.arange(b)),
    )
    hlo = jax.jit(lambda *a: select_tokens(*a, use_filter=True)).lower(*args).as_text()
    assert "chlo.top_k" in hlo  # a bounded candidate set...
    assert "stablehlo.sort" not in hlo  # ...and no sort of the vocabulary


def test_filtered_sampling_frequencies_match_the_numpy_distribution():
    rng = np.random.default_rng(0)
    v, n = 300, 20000
    logits = (rng.standard_normal(v) * 2.5).astype(np.float32)
    temperature, top_p, top_k = 0.8, 0.85, 40
    scaled = logits / temperature
    kept = _numpy_kept(scaled[None], [top_p], [top_k])[0]
    cutoff = np.sort(scaled)[::-1][kept - 1]
    q = np.where(scaled >= cutoff, np.exp(scaled - scaled.max()), 0.0)
    q /= q.sum()
    # max_candidates=4 < kept (7) < top_k: the rows go through the bisection path.
    assert 4 < kept < top_k
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(n))
    for max_candidates in (4, 256):
        tokens, _ = jax.jit(
            lambda k, max_candidates=max_candidates: select_tokens(
                jnp.broadcast_to(logits, (n, v)),
                jnp.full((n,), temperature),
                jnp.full((n,), top_p),
                jnp.full((n,), top_k, jnp.int32),
                k,
                use_filter=True,
                max_candidates=max_candidates,
            )
        )(keys)
        freq = np.bincount(np.asarray(tokens), minlength=v) / n
        assert np.all(q[np.asarray(tokens)] > 0), "a filtered-out token was sampled"
        assert 0.5 * np.abs(freq - q).sum() < 0.03, max_candidates


def test_fsdp8_mesh_gives_the_same_greedy_tokens_as_one_device(tmp_path):
    path = tmp_path / "m"
    model = make_tiny_llama(path)
    mesh = make_mesh(fsdp=8)
    sharded = JaxSampler.from_hf_dir(path, compute_dtype=jnp.float32, mesh=mesh)
    single = JaxSampler.from_hf_dir(path, compute_dtype=jnp.float32)
    split = [x for x in jax.tree.leaves(sharded.params) if not x.sharding.is_fully_replicated]
    assert len(split) >= 5
    for x in split:  # FSDP: no device holds a whole weight
        assert all(s.data.size < x.size for s in x.addressable_shards)
    prompts = _prompts(model.config.vocab_size)
    sp = SamplingParams(temperature=0.0, max_new_tokens=12)
    got = [c.token_ids for c in sharded.generate(prompts, sp)]
    assert got == [c.token_ids for c in single.generate(prompts, sp)]
    assert got == _hf_greedy(model, prompts, 12)
