"""JaxSampler against independent references: transformers' greedy ``generate`` and torch
log-softmax (fp32), numpy-computed temperature / top-p / top-k distributions (chi-square),
finish reasons, seeds, sharding, and weight swaps without recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from advgame_jax.models import load_hf, make_mesh
from advgame_jax.sampling import (
    Completion,
    InMemoryWeights,
    Sampler,
    SamplingParams,
    SyncCheckpoint,
)
from advgame_jax.sampling.checkpoints import restore_params, save_params
from advgame_jax.sampling.jax_sampler import JaxSampler, next_pow2
from tests.tiny_models import make_tiny_llama, make_tiny_qwen2

PROMPT_LENS = (3, 9, 14)
N_NEW = 32
# A statistic this large has probability 1e-4 under the reference distribution.
CHI2_P = 1e-4


def _prompts(vocab, seed=0, lens=PROMPT_LENS):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, n)] for n in lens]


def _hf_greedy(model, prompts, n_new):
    """transformers' greedy generate on the left-padded batch, EOS disabled."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return [tuple(int(t) for t in row[width:]) for row in out]


def _torch_logprobs(model, prompt, completion):
    """log_softmax of the torch model at each completion position, gathered (float64)."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return lp.gather(-1, torch.tensor(completion)[:, None])[:, 0].numpy()


def _next_token_logits(model, prompt):
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].double().numpy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    model = make_tiny_llama(path)
    return model, JaxSampler.from_hf_dir(path, compute_dtype=jnp.float32)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    model = make_tiny_qwen2(path)
    return model, JaxSampler.from_hf_dir(path, compute_dtype=jnp.float32)


def test_bucket_rounding():
    assert [next_pow2(x, 16) for x in (1, 16, 17, 100, 1024)] == [16, 16, 32, 128, 1024]
    assert [next_pow2(x) for x in (1, 2, 3, 5)] == [1, 2, 4, 8]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_matches_transformers_generate(family, request):
    model, sampler = request.getfixturevalue(family)
    assert isinstance(sampler, Sampler)
    prompts = _prompts(model.config.vocab_size)
    want = _hf_greedy(model, prompts, N_NEW)
    # A stop id that greedy decoding never produces must not change anything.
    unused = next(t for t in range(3, 256) if all(t not in w for w in want))
    got = sampler.generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=N_NEW, stop_token_ids=(unused,))
    )
    assert [c.token_ids for c in got] == want
    for prompt, c in zip(prompts, got):
        assert isinstance(c, Completion) and c.finish_reason == "length"
        np.testing.assert_allclose(
            c.logprobs, _torch_logprobs(model, prompt, c.token_ids), atol=1e-4, rtol=0
        )


def test_decode_equals_teacher_forced_forward_at_smollm2_head_layout(tmp_path):
    """SmolLM2's attention shape (9 query / 3 KV heads, RoPE theta 1e5, tied embeddings) in a
    tiny random model. One batch mixes prompt lengths on both sides of the prompt bucket (16;
    left padding up to 29 slots, filler rows) and holds the pad id 0 and EOS id 2 inside the
    prompts, as chat turns do; 20 new tokens cross the 16-token new-token bucket. Every row's
    decode must equal a teacher-forced torch forward of its own prefix, step by step (argmax
    and log-prob), and transformers' generate given an explicit attention mask (without one
    it infers the mask from the pad id and masks those prompt tokens)."""
    model = make_tiny_llama(
        tmp_path,
        hidden_size=72,
        num_heads=9,
        num_kv_heads=3,
        head_dim=16,
        rope_scaling=None,
        rope_theta=1e5,
        tie=True,
        seed=3,
    )
    sampler = JaxSampler.from_hf_dir(tmp_path, compute_dtype=jnp.float32, tokenizer=None)
    lens = (3, 15, 16, 17, 30)
    prompts = _prompts(model.config.vocab_size, seed=5, lens=lens)
    for p in prompts[1:]:
        p[len(p) // 3], p[len(p) // 2] = 0, 2  # pad and EOS ids mid-prompt
    n_new = 20
    got = sampler.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=n_new))
    for prompt, c in zip(prompts, got):
        assert len(c.token_ids) == n_new
        seq = torch.tensor([list(prompt) + list(c.token_ids)])
        with torch.no_grad():
            logits = model(seq, attention_mask=torch.ones_like(seq)).logits[0].double()
        steps = logits[len(prompt) - 1 : -1]  # the logits that chose each new token
        top2 = steps.topk(2, dim=-1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3  # no near-ties to excuse
        assert c.token_ids == tuple(int(t) for t in steps.argmax(-1))
        lp = torch.log_softmax(steps, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        np.testing.assert_allclose(c.logprobs, lp.numpy(), atol=1e-4, rtol=0)
    ref = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        ref.append(tuple(int(t) for t in out[0, len(prompt) :]))
    assert [c.token_ids for c in got] == ref


def test_stop_tokens_and_lengths_give_per_row_finish_reasons(llama):
    model, sampler = llama
    prompts = _prompts(model.config.vocab_size)
    greedy = _hf_greedy(model, prompts, N_NEW)
    stop = greedy[0][5]  # greedy row 0 produces this at step 5
    first_hit = [g.index(stop) if stop in g else None for g in greedy]
    sp = SamplingParams(temperature=0.0, max_new_tokens=N_NEW, stop_token_ids=(stop, 1))
    short = SamplingParams(temperature=0.0, max_new_tokens=20)
    got_a, got_b = sampler.generate_many([(prompts[:2], sp), (prompts[2:], short)])
    for g, hit, c in zip(greedy[:2], first_hit[:2], got_a):
        if hit is None:
            assert c.finish_reason == "length" and c.token_ids == g
        else:
            assert c.finish_reason == "stop"
            assert c.token_ids == g[: hit + 1]  # the stop token is included
            assert len(c.logprobs) == hit + 1
    assert got_a[0].finish_reason == "stop" and len(got_a[0].token_ids) == 6
    (c,) = got_b
    assert c.finish_reason == "length" and c.token_ids == greedy[2][:20]


def _reference_dist(logits, temperature, top_p=1.0, top_k=0):
    """numpy: softmax(logits / T) restricted to top-k and the nucleus, renormalised."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.ones(len(p), bool)
    if top_k:
        keep[order[top_k:]] = False
    mass_before = np.cumsum(p[order]) - p[order]
    keep[order[mass_before >= top_p]] = False
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def _chi_square_ok(tokens, q):
    counts = np.bincount(tokens, minlength=len(q))
    n = len(tokens)
    support = np.flatnonzero(q)
    exp = q[support] * n
    obs = counts[support].astype(float)
    big = exp >= 5  # pool rare bins so the chi-square approximation holds
    exp_bins = np.append(exp[big], exp[~big].sum())
    obs_bins = np.append(obs[big], obs[~big].sum())
    if exp_bins[-1] == 0:
        exp_bins, obs_bins = exp_bins[:-1], obs_bins[:-1]
    stat = float(((obs_bins - exp_bins) ** 2 / exp_bins).sum())
    threshold = scipy.stats.chi2.ppf(1 - CHI2_P, len(exp_bins) - 1)
    return stat, threshold


def test_temperature_top_p_frequencies_match_numpy_reference(llama):
    model, sampler = llama
    prompt = [5, 17, 33, 8]
    logits = _next_token_logits(model, prompt)
    temperature = 0.7
    p = _reference_dist(logits, temperature)
    cum = np.cumsum(np.sort(p)[::-1])
    k = int(np.searchsorted(cum, 0.8))
    top_p = float((cum[k - 1] + cum[k]) / 2)  # far from both nucleus boundaries
    assert min(top_p - cum[k - 1], cum[k] - top_p) > 1e-3
    q = _reference_dist(logits, temperature, top_p=top_p)
    assert (q > 0).sum() == k + 1 and (q > 0).sum() < (p > 1e-6).sum()

    sp = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=1, n=4000, seed=1234)
    draws = sampler.generate([prompt], sp)
    tokens = np.array([c.token_ids[0] for c in draws])
    assert np.all(q[tokens] > 0), "a token outside the nucleus was sampled"
    stat, threshold = _chi_square_ok(tokens, q)
    assert stat < threshold, (stat, threshold)
    tv = 0.5 * np.abs(np.bincount(tokens, minlength=len(q)) / len(tokens) - q).sum()
    assert tv < 0.05
    # log-probs are the untempered model's, not the sampling distribution's
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    np.testing.assert_allclose([c.logprobs[0] for c in draws[:50]], logp[tokens[:50]], atol=1e-4)

    again = sampler.generate([prompt], sp)
    assert [c.token_ids for c in again] == [c.token_ids for c in draws]
    other = sampler.generate(
        [prompt],
        SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=1, n=4000, seed=1235),
    )
    other_tokens = np.array([c.token_ids[0] for c in other])
    assert (other_tokens != tokens).mean() > 0.3


def test_top_k_never_leaves_top_k_and_matches_reference(llama):
    model, sampler = llama
    prompt = [9, 4, 200]
    logits = _next_token_logits(model, prompt)
    top8 = set(np.argsort(-logits)[:8].tolist())
    sp = SamplingParams(temperature=0.8, top_k=8, max_new_tokens=1, n=4000, seed=7)
    tokens = np.array([c.token_ids[0] for c in sampler.generate([prompt], sp)])
    assert set(tokens.tolist()) <= top8
    stat, threshold = _chi_square_ok(tokens, _reference_dist(logits, 0.8, top_k=8))
    assert stat < threshold, (stat, threshold)
    # top-k and top-p together: the smaller of the two sets
    q = _reference_dist(logits, 1.5, top_p=0.5, top_k=5)
    both = SamplingParams(temperature=1.5, top_k=5, top_p=0.5, max_new_tokens=1, n=500, seed=8)
    tokens = np.array([c.token_ids[0] for c in sampler.generate([prompt], both)])
    assert np.all(q[tokens] > 0)


def test_request_samples_do_not_depend_on_batch_composition(llama):
    model, sampler = llama
    a, b = [5, 6, 7, 8, 9], [11, 12]
    sp_a = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=8, n=200, seed=3)
    sp_b = SamplingParams(temperature=0.8, top_k=20, max_new_tokens=8, n=56, seed=4)
    alone = sampler.generate([a], sp_a)
    mixed, _ = sampler.generate_many([([a], sp_a), ([b], sp_b)])
    assert [c.token_ids for c in mixed] == [c.token_ids for c in alone]
    assert len({c.token_ids for c in alone}) > 100  # the n samples are distinct draws


def test_sharded_mesh_gives_the_same_greedy_tokens(tmp_path, llama):
    model, sampler = llama
    mesh = make_mesh(data=2, tensor=2)
    path = tmp_path / "m"
    make_tiny_llama(path)
    sharded = JaxSampler.from_hf_dir(path, compute_dtype=jnp.float32, mesh=mesh)
    emb = sharded.params["embed"]
    assert emb.sharding.mesh.shape["tensor"] == 2
    prompts = _prompts(model.config.vocab_size)
    sp = SamplingParams(temperature=0.0, max_new_tokens=N_NEW)
    want = _hf_greedy(model, prompts, N_NEW)
    assert [c.token_ids for c in sharded.generate(prompts, sp)] == want


class _CompileCounter:
    """Counts XLA backend compilations via jax.monitoring (independent of the sampler), and
    loads from the persistent compilation cache (the test run shares one, tests/conftest.py),
    which would otherwise hide a recompile."""

    EVENTS = (
        "/jax/core/compile/backend_compile_duration",
        "/jax/compilation_cache/cache_retrieval_time_sec",
    )

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event in self.EVENTS:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_weight_updates_do_not_recompile(tmp_path, llama):
    model, sampler = llama
    prompts = _prompts(model.config.vocab_size)
    sp = SamplingParams(temperature=0.0, max_new_tokens=N_NEW)
    new_model = make_tiny_llama(tmp_path / "b", seed=1)
    _, new_params = load_hf(tmp_path / "b")
    old_params = sampler.params
    try:
        before = sampler.generate(prompts, sp)  # compiled here (or by an earlier test)
        assert sampler.load_weights(InMemoryWeights(new_params, version=1)) == 1
        # The sampler holds its own copy: the caller may donate / delete its arrays.
        jax.tree.map(lambda x: x.delete(), new_params)
        with _CompileCounter() as counter:
            after = sampler.generate(prompts, sp)
        assert counter.count == 0
        assert [c.token_ids for c in after] == _hf_greedy(new_model, prompts, N_NEW)
        assert [c.token_ids for c in after] != [c.token_ids for c in before]

        # From an Orbax checkpoint: a game-style tree, restoring one sub-tree.
        _, new_params = load_hf(tmp_path / "b")
        save_params(
            str(tmp_path / "ck"), {"defender": {"ema_params": old_params, "params": new_params}}
        )
        restored = restore_params(
            str(tmp_path / "ck"), key_path=("defender", "ema_params"), like=sampler.params
        )
        sampler.load_weights(InMemoryWeights(restored, version=2, copy=False))
        with _CompileCounter() as counter:
            back = sampler.generate(prompts, sp)
        assert counter.count == 0
        assert [c.token_ids for c in back] == [c.token_ids for c in before]
    finally:
        sampler.load_weights(InMemoryWeights(old_params, version=0))


def test_bad_inputs_raise_clear_errors(llama):
    _, sampler = llama
    with pytest.raises(ValueError, match="empty"):
        sampler.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        sampler.generate([[5, 10**6]], SamplingParams())
    # Over the prompt budget: not an error but the game's MAX_LENGTH (test_prompt_budget.py).
    over = sampler.generate([[5] * (sampler.prompt_budget + 1)], SamplingParams())
    assert over[0].token_ids == () and over[0].finish_reason == "length"
    with pytest.raises(TypeError, match="InMemoryWeights"):
        sampler.load_weights(SyncCheckpoint("/nonexistent"))
    with pytest.raises(ValueError, match="shape"):
        sampler.load_weights(
            InMemoryWeights(jax.tree.map(lambda x: x[..., :1], sampler.params), version=9)
        )
    assert sampler.stats()["weights_version"] != 9  # a failed load changes nothing
