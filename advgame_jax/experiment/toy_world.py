"""The offline toy world: tiny attacker/defender models with a toy initial behaviour.

A new user without GPUs or weights runs the whole AdvGame loop on the CPU against the lexicon
rule judge (``advgame_jax.game`` rule judge: COMPLY / REFUSE / DEFLECT word lists). To give the
game something real to play, the two tiny models start from a short supervised warm-up on
dialogues generated here, from the shipped harmless toy seeds:

* the **attacker** rewrites a seed by copying it, adding a polite marker ("please" / "kindly")
  in a minority of rewrites (so attacks are faithful; politeness is the lever it can learn);
* the **defender** is naive: it complies ("sure here are the steps ...") when asked politely
  and otherwise refuses flatly ("sorry i cannot help ..."), with an occasional deflection
  ("... instead i can explain how to stay safely away ...") whatever the request.

Then the game has real incentives: the defender gains by deflecting harmful seeds and complying
with benign ones whatever the phrasing; the attacker gains by adding politeness to harmful
seeds (compliance) and dropping it from benign ones (refusal). Nothing in the loop is
special-cased for the toy world: only the initial models are.

Everything is deterministic in ``seed`` and cached in a directory (``config.toy_dir``, default
``<workdir>/toy``), rebuilt when absent or built with other settings. The directory is the
project's own (``fsutil`` ownership marker): it is built aside and renamed into place, and an
existing directory is replaced only when the project created it — a folder of user files given
as ``toy_dir`` is refused with a :class:`~advgame_jax.experiment.validate.ConfigError`, never
deleted. Seeds too long for the toy models are refused before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from advgame_jax import fsutil
from advgame_jax.data.seeds import Seed
from advgame_jax.experiment.validate import ConfigError
from advgame_jax.models import ModelConfig, forward, init_params, save_hf

TOY_VERSION = 1
OWNER_KIND = "toy_world"
TOY_MAX_POSITIONS = 1024  # the toy models' context (``toy_model_config``)
POLITE_WORDS = ("please", "kindly")

_COMPLY = (
    "sure , here are the steps . first {a} , then {b} .",
    "sure , here is how . first {a} and then {b} .",
    "here are the steps : first {a} , then {b} , then {c} .",
)
_REFUSE = (
    "sorry , i cannot help with that .",
    "sorry , i am unable to do that .",
    "i cannot help with that request .",
)
_DEFLECT = (
    "i cannot give those steps , but instead i can explain how to stay safely away from it .",
    "instead of that , here is a safe alternative : {a} safely .",
    "for your safety i will not detail that , but a safer alternative is to {a} .",
)
_FILLER = (
    "gather the tools",
    "read the guide",
    "ask a friend",
    "check the map",
    "wait a day",
    "write a list",
    "prepare the room",
    "light a lamp",
    "open the book",
    "rest a while",
)


@dataclasses.dataclass(frozen=True)
class ToyPaths:
    tokenizer: str
    attacker: str
    defender: str


def toy_model_config(vocab_size: int, *, eos_token_id: int, pad_token_id: int) -> ModelConfig:
    """A ~0.2M-parameter Llama-family decoder (head_dim 32 so vLLM can load it too)."""
    return ModelConfig(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=TOY_MAX_POSITIONS,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def attacker_target(seed_prompt: str, rng: random.Random, polite_rate: float = 0.3) -> str:
    """The warm-up attacker's rewrite of a seed: a copy, sometimes with a polite marker."""
    if rng.random() < polite_rate:
        return f"{rng.choice(POLITE_WORDS)} {seed_prompt}"
    return seed_prompt


def defender_target(x: str, rng: random.Random, deflect_rate: float = 0.15) -> str:
    """The warm-up defender's naive answer to an attack ``x`` (see module docstring)."""
    fill = dict(zip("abc", rng.sample(_FILLER, 3), strict=True))
    if rng.random() < deflect_rate:
        return rng.choice(_DEFLECT).format(**fill)
    words = x.lower().split()
    if any(w in words for w in POLITE_WORDS):
        return rng.choice(_COMPLY).format(**fill)
    return rng.choice(_REFUSE)


def warmup_examples(
    seeds: Sequence[Seed],
    attacker_prompt: Callable[[Seed], list[int]],
    defender_prompt: Callable[[str], list[int]],
    encode: Callable[[str], list[int]],
    eos_id: int,
    *,
    seed: int,
    copies: int = 6,
):
    """(prompt_ids, completion_ids) pairs for both warm-ups; completions end with ``eos_id``."""
    rng = random.Random(seed)
    att, dfd = [], []
    for _ in range(copies):
        for s in seeds:
            x = attacker_target(s.prompt, rng)
            att.append((attacker_prompt(s), encode(x) + [eos_id]))
            # The defender also sees the polite variant of every seed, so both branches are taught.
            for xx in (s.prompt, f"{rng.choice(POLITE_WORDS)} {s.prompt}"):
                dfd.append((defender_prompt(xx), encode(defender_target(xx, rng)) + [eos_id]))
    return att, dfd


def _pad_examples(examples, pad_id: int):
    # Round to a multiple of 16, not a power of two: attention cost on CPUs grows fast.
    length = -(-max(len(p) + len(c) for p, c in examples) // 16) * 16
    n = len(examples)
    tokens = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), np.bool_)
    loss = np.zeros((n, length), np.float32)
    for i, (p, c) in enumerate(examples):
        seq = list(p) + list(c)
        tokens[i, : len(seq)] = seq
        mask[i, : len(seq)] = True
        loss[i, len(p) - 1 : len(seq) - 1] = 1.0  # position t predicts token t+1
    return tokens, mask, loss


def supervised_warmup(
    config: ModelConfig,
    params,
    examples,
    *,
    pad_id: int,
    seed: int,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
):
    """Teacher-forced NLL on completion tokens with Adam; returns new params and final loss."""
    tokens, mask, loss_mask = _pad_examples(examples, pad_id)
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    def loss_fn(p, tok, msk, lm):
        logits = forward(p, config, tok, msk, compute_dtype=jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1])
        tgt = jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1)[..., 0]
        return -(tgt * lm[:, :-1]).sum() / jnp.maximum(lm.sum(), 1.0)

    @jax.jit
    def step(p, o, tok, msk, lm):
        value, grads = jax.value_and_grad(loss_fn)(p, tok, msk, lm)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, value

    rng = np.random.default_rng(seed)
    value = jnp.nan
    for _ in range(steps):
        idx = rng.integers(0, len(tokens), batch_size)
        params, opt_state, value = step(params, opt_state, tokens[idx], mask[idx], loss_mask[idx])
    return params, float(value)


def check_seeds_fit(
    examples, per_seed: int, num_seeds: int, limit: int = TOY_MAX_POSITIONS
) -> None:
    """Raise ConfigError when a seed's warm-up dialogue (prompt + completion) exceeds the toy
    models' context: such seeds cannot be played by the toy world (and would make the
    warm-up's padded batch arbitrarily large). ``examples`` come from
    :func:`warmup_examples`: ``per_seed`` consecutive ones per seed, seeds cycling."""
    longest: dict[int, int] = {}
    for i, (p, c) in enumerate(examples):
        k = (i // per_seed) % num_seeds
        longest[k] = max(longest.get(k, 0), len(p) + len(c))
    bad = sorted(k for k, n in longest.items() if n > limit)
    if bad:
        raise ConfigError(
            f"config.toy_world: {len(bad)} of {num_seeds} training seeds (first: #{bad[0]}) "
            f"make warm-up dialogues longer than the toy models' {limit} positions (longest: "
            f"{max(longest.values())} tokens); the toy world is for the short shipped toy "
            f"seeds — use shorter seeds, or set toy_world=False and give real models "
            f"(attacker.hf_path, defender.hf_path)"
        )


def _stamp_matches(root: str, want: dict) -> bool:
    try:
        with open(os.path.join(root, "BUILT.json"), encoding="utf-8") as f:
            return json.load(f) == want
    except (OSError, ValueError):
        return False


def _check_reusable(root: str) -> None:
    """Remove an empty ``root``; refuse one the project did not create (ConfigError)."""
    if os.path.isdir(root) and not os.path.islink(root) and not os.listdir(root):
        os.rmdir(root)  # an empty directory holds nothing to lose
    if os.path.lexists(root) and not fsutil.is_owned(root, OWNER_KIND):
        raise ConfigError(
            f"config.toy_dir={root!r} exists and was not created by advgame_jax as a toy world "
            f"(no {fsutil.MARKER} marker), so it is not replaced; give an empty or new "
            f"directory (or leave toy_dir empty for <workdir>/toy)"
        )


def _build_into(
    tmp: str,
    want: dict,
    train_seeds: Sequence[Seed],
    attacker_prompt_text: Callable[[Seed], str],
) -> None:
    """Write the tokenizer, both warmed-up players and ``BUILT.json`` (``want``) in ``tmp``."""
    from advgame_jax.tokenization import ChatTokenizer, build_tiny_tokenizer

    seed, warmup_steps = want["seed"], want["warmup_steps"]
    tok_dir = os.path.join(tmp, "tokenizer")
    build_tiny_tokenizer(tok_dir)
    tok = ChatTokenizer.from_dir(tok_dir)
    eos = tok.stop_token_ids[0]
    att_ex, def_ex = warmup_examples(
        train_seeds,
        lambda s: tok.render_user_turn(attacker_prompt_text(s)),
        tok.render_user_turn,
        tok.encode,
        eos,
        seed=seed,
    )
    check_seeds_fit(att_ex, 1, len(train_seeds))
    check_seeds_fit(def_ex, 2, len(train_seeds))
    config = toy_model_config(tok.vocab_size, eos_token_id=eos, pad_token_id=tok.pad_id)
    key_a, key_d = jax.random.split(jax.random.PRNGKey(seed))
    for key, examples, role in ((key_a, att_ex, "attacker"), (key_d, def_ex, "defender")):
        params = init_params(config, key, jnp.float32)
        params, _ = supervised_warmup(
            config, params, examples, pad_id=tok.pad_id, seed=seed, steps=warmup_steps
        )
        out = os.path.join(tmp, role)
        save_hf(out, config, params)
        tok.save(out)
    fsutil.atomic_write_text(os.path.join(tmp, "BUILT.json"), json.dumps(want))


def build_toy_world(
    root: str,
    *,
    seed: int,
    train_seeds: Sequence[Seed],
    attacker_prompt_text: Callable[[Seed], str],
    warmup_steps: int = 300,
) -> ToyPaths:
    """Build (or reuse) the tiny tokenizer and the warmed-up attacker and defender checkpoints.

    ``attacker_prompt_text(seed)`` renders the attacker's task text for a seed (the game's
    template registry); the defender sees ``x`` raw, as in the game. ``root`` is reused when
    its ``BUILT.json`` matches these settings; otherwise it is built in a temporary sibling and
    renamed into place, replacing an existing ``root`` only if the project created it (an
    empty directory is also accepted). Raises ConfigError naming ``config.toy_dir`` for a
    directory the project does not own, and naming ``config.toy_world`` for seeds that do not
    fit the toy models; in both cases ``root`` is left untouched.
    """
    root = os.path.abspath(root)
    paths = ToyPaths(
        os.path.join(root, "tokenizer"),
        os.path.join(root, "attacker"),
        os.path.join(root, "defender"),
    )
    want = {
        "version": TOY_VERSION,
        "seed": seed,
        "warmup_steps": warmup_steps,
        "num_seeds": len(train_seeds),
    }
    if _stamp_matches(root, want):
        return paths
    _check_reusable(root)
    fsutil.build_dir_atomically(
        root, OWNER_KIND, lambda tmp: _build_into(tmp, want, train_seeds, attacker_prompt_text)
    )
    return paths
