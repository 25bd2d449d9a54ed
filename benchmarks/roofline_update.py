"""The update half of ``roofline.py``: the project's DPO update step against a torch DPO step
on the same pairs, timed interleaved in one process.

Both sides start from the same HF checkpoint. The reference model is the policy with its
final RMSNorm weight scaled by ``REF_NORM_SCALE`` (the same function on both sides), so the
first loss is not the trivial log 2 and checks the log-probs of both models. Correctness: the
first step's DPO loss agrees within 1e-5 and the gradient norm within 1e-4 (relative).

FLOPs of one step: ``train_step.model_flops`` (policy forward+backward 6·N·tokens, reference
forward 2·N·tokens, causal attention); the fraction of the roofline is the achieved FLOP/s
over the fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from advgame_jax.training import collate_pairs, init_player_state  # noqa: E402
from advgame_jax.training.optimizer import OptimizerSettings  # noqa: E402
from advgame_jax.training.update import LossSettings, StepSettings, UpdateSettings, update_step_from  # noqa: E402
from advgame_jax.types import TokenPair  # noqa: E402

REF_NORM_SCALE = 1.25
BETA = 0.1
LR = 1e-6


def make_pairs(vocab: int, pairs: int, seq: int, seed: int = 0):
    """``pairs`` random preference pairs of exactly ``seq`` tokens (half prompt)."""
    rng = np.random.default_rng(seed)
    prompt = seq // 2
    out = []
    for _ in range(pairs):
        p, c, r = (
            tuple(int(x) for x in rng.integers(3, vocab, n))
            for n in (prompt, seq - prompt, seq - prompt)
        )
        out.append(TokenPair(p, c, r))
    return out


class JaxUpdate:
    """The project's update step (DPO, fp32) on a fixed batch; ``step()`` runs one update."""

    def __init__(
        self, config, params, batch, *, remat="full", attention="auto", max_tokens_per_device=None
    ):
        self.fn = update_step_from(
            config,
            UpdateSettings(
                loss=LossSettings(kind="dpo", beta=BETA),
                optim=OptimizerSettings(LR, num_steps=1000),
                train=StepSettings(
                    compute_dtype=jnp.float32,
                    chunk_size=1024,
                    remat=remat,
                    attention_impl=attention,
                    max_tokens_per_device=max_tokens_per_device,
                ),
            ),
        )
        self.opt = self.fn.optimizer
        ref = dict(params)
        ref["final_norm"] = params["final_norm"] * REF_NORM_SCALE
        own = jax.tree.map(jnp.copy, params)  # the step donates the state: never the caller's
        state = init_player_state(own, self.opt, reference="initial", keep_ema=False)
        self.state0 = state.replace(ref_params=jax.tree.map(jnp.array, ref))
        self.batch = batch
        self.state = None

    def first(self):
        state, self.state0 = self.state0, None  # donated to the step (held once)
        state, m = self.fn(state, self.batch)
        self.state = state
        return {k: float(v) for k, v in m.items()}

    def step(self):
        self.state, m = self.fn(self.state, self.batch)
        jax.block_until_ready(m)


class TorchUpdate:
    """A plain torch DPO step (transformers model, AdamW, global-norm clipping at 1)."""

    def __init__(self, model_dir, batch, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            self.ref.model.norm.weight.mul_(REF_NORM_SCALE)
        for p in self.ref.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.policy.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
        )
        p, _, t = batch.tokens.shape
        flat = lambda x: torch.as_tensor(np.asarray(x).reshape(2 * p, t))  # noqa: E731
        self.tokens = flat(batch.tokens).long()
        self.mask = flat(batch.attention_mask).long()
        self.positions = flat(batch.positions).long()
        self.loss_mask = flat(batch.loss_mask)[:, 1:].float()
        self.valid = torch.as_tensor(np.asarray(batch.pair_valid))

    def _seq_logprobs(self, model):
        logits = (
            model(input_ids=self.tokens, attention_mask=self.mask, position_ids=self.positions)
            .logits[:, :-1]
            .float()
        )
        lp = torch_log_softmax_gather(self.torch, logits, self.tokens[:, 1:])
        return (lp * self.loss_mask).sum(-1).reshape(-1, 2)

    def step(self):
        torch = self.torch
        with torch.no_grad():
            ref = self._seq_logprobs(self.ref)
        pi = self._seq_logprobs(self.policy)
        margin = (pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1])
        per = -torch.nn.functional.logsigmoid(BETA * margin)
        loss = per[self.valid].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach()), float(norm)


def torch_log_softmax_gather(torch, logits, targets):
    return torch.gather(torch.log_softmax(logits, -1), -1, targets[..., None])[..., 0]


def n_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def run_update(
    config,
    params,
    model_dir,
    *,
    pairs: int,
    seq: int,
    repeats: int,
    torch_threads: int,
    timer,
    remat="full",
    attention="auto",
    max_tokens_per_device=None,
):
    """Correctness check, then interleaved timings of both steps. Returns a result dict."""
    from benchmarks.train_step import model_flops

    batch = collate_pairs(
        make_pairs(config.vocab_size, pairs, seq), pad_id=0, length_buckets=(seq,)
    )
    jx = JaxUpdate(
        config,
        params,
        batch,
        remat=remat,
        attention=attention,
        max_tokens_per_device=max_tokens_per_device,
    )
    th = TorchUpdate(model_dir, batch, torch_threads)
    t0 = time.perf_counter()
    m = jx.first()
    compile_s = time.perf_counter() - t0
    t_loss, t_norm = th.step()
    loss_diff = abs(m["loss"] - t_loss)
    norm_rel = abs(m["grad_norm"] - t_norm) / max(t_norm, 1e-30)
    times = {"jax": [], "torch": []}
    for _ in range(repeats):
        times["jax"].append(timer(jx.step))
        times["torch"].append(timer(th.step))
    flops = model_flops(config, n_params(params), pairs, seq)
    return dict(
        pairs=pairs,
        seq=seq,
        tokens=2 * pairs * seq,
        flops=flops,
        jax_loss=m["loss"],
        torch_loss=t_loss,
        loss_abs_diff=loss_diff,
        grad_norm_rel_diff=norm_rel,
        jax_compile_s=compile_s,
        times=times,
        nontrivial=abs(m["loss"] - math.log(2)) > 1e-6,
    )
