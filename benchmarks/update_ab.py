"""Before/after of the DPO update step in one process: a baseline tree of the package
(imported under another name, as for ``decode_ab.py``) and this tree's, on the same SmolLM2
pairs, fp32, steps interleaved.

    git archive <base> advgame_jax | tar x -C /tmp/base && mv /tmp/base/advgame_jax \\
        /tmp/base/advgame_base && grep -rl advgame_jax /tmp/base/advgame_base \\
        | xargs sed -i 's/\\badvgame_jax\\b/advgame_base/g'
    PYTHONPATH=.:/tmp/base python benchmarks/update_ab.py --base advgame_base

Both sides start from the same weights and batch (the reference model is the policy with
its final norm scaled, as in ``roofline_update.py``, so the first loss is not log 2).
Correctness: the first step's loss and gradient norm, and the largest difference of the
params after it. Timing: median over ``--repeats`` rounds of one step each, by wall clock and
by process CPU time, and the model FLOPs per CPU second over the fp32 matmul peak measured in
the same process between the rounds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.roofline import _smollm2_dir, timer  # noqa: E402
from benchmarks.roofline_update import BETA, LR, REF_NORM_SCALE, make_pairs, n_params  # noqa: E402
from benchmarks.train_step import model_flops  # noqa: E402


class Update:
    """One package's update step (DPO, fp32, remat 'full', attention 'auto') on ``batch``."""

    def __init__(self, package: str, model_dir: str, pairs, seq: int, max_tokens_per_device):
        models = importlib.import_module(f"{package}.models")
        training = importlib.import_module(f"{package}.training")
        upd = importlib.import_module(f"{package}.training.update")
        opt = importlib.import_module(f"{package}.training.optimizer")
        self.config, params = models.load_hf(model_dir, jnp.float32)
        batch = training.collate_pairs(pairs, pad_id=0, length_buckets=(seq,))
        self.fn = upd.update_step_from(
            self.config,
            upd.UpdateSettings(
                loss=upd.LossSettings(kind="dpo", beta=BETA),
                optim=opt.OptimizerSettings(LR, num_steps=1000),
                train=upd.StepSettings(
                    compute_dtype=jnp.float32,
                    remat="full",
                    attention_impl="auto",
                    max_tokens_per_device=max_tokens_per_device,
                ),
            ),
        )
        ref = dict(params)
        ref["final_norm"] = params["final_norm"] * REF_NORM_SCALE
        state = training.init_player_state(
            params, self.fn.optimizer, reference="initial", keep_ema=False
        )
        self.state = state.replace(ref_params=jax.tree.map(jnp.array, ref))
        self.batch, self.n = batch, n_params(params)

    def step(self):
        self.state, m = self.fn(self.state, self.batch)
        return {k: float(v) for k, v in jax.block_until_ready(m).items()}


def _matmul_peak(n: int = 2048) -> float:
    """fp32 GFLOP per CPU second of the fastest of 3 n³ products."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    return 2 * n**3 / min(timer(lambda: jax.block_until_ready(f(a)))[1] for _ in range(3)) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="", help="package name of the baseline tree")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--max_tokens_per_device", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    model_dir = _smollm2_dir()
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    pairs = make_pairs(vocab, a.pairs, a.seq)
    names = (["before"] if a.base else []) + ["after"]
    pkgs = dict(zip(names, ([a.base] if a.base else []) + ["advgame_jax"]))
    ups = {
        k: Update(pkg, model_dir, pairs, a.seq, a.max_tokens_per_device) for k, pkg in pkgs.items()
    }
    first = {k: u.step() for k, u in ups.items()}  # compiles
    params = {k: jax.tree.leaves(u.state.params) for k, u in ups.items()}
    diff = max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(params[names[0]], params[names[-1]], strict=True)
    )
    del params
    times, peaks = {k: [] for k in ups}, []
    for _ in range(a.repeats):
        for k, u in ups.items():
            times[k].append(timer(u.step))
        peaks.append(_matmul_peak())
    flops = model_flops(ups["after"].config, ups["after"].n, a.pairs, a.seq)
    peak = statistics.median(peaks)
    print(
        f"DPO update, SmolLM2-135M fp32, {a.pairs} pairs x {a.seq} tokens; "
        f"matmul peak {peak:.0f} GFLOP/cpu-s (median of {a.repeats})"
    )
    print("| tree | wall s | CPU s | GFLOP/cpu-s | / peak | first loss | grad norm |")
    print("|---|---|---|---|---|---|---|")
    for k, ts in times.items():
        w, c = (statistics.median(t[i] for t in ts) for i in (0, 1))
        print(
            f"| {k} | {w:.2f} | {c:.2f} | {flops / c / 1e9:.1f} | {flops / c / 1e9 / peak:.0%} "
            f"| {first[k]['loss']:.7f} | {first[k]['grad_norm']:.6f} |"
        )
    if a.base:
        print(f"largest params difference after the first step: {diff:.3g}")
    print(json.dumps({"times": times, "peaks": peaks, "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
