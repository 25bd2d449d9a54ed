"""Before/after of the JAX sampler's decode in one process: a baseline tree of the package
(imported under another name) and this tree's, with transformers ``generate`` as the common
reference, on the same SmolLM2 prompts, greedy, rounds interleaved.

    git archive <base> advgame_jax | tar x -C /tmp/base && mv /tmp/base/advgame_jax \\
        /tmp/base/advgame_base && grep -rl advgame_jax /tmp/base/advgame_base \\
        | xargs sed -i 's/\\badvgame_jax\\b/advgame_base/g'
    PYTHONPATH=.:/tmp/base python benchmarks/decode_ab.py --base advgame_base

Prints per engine the median (over ``--repeats`` rounds) of decode = t(N) − t(1), by wall
clock and by process CPU time, ms per step, t(1) (prefill and per-call setup), the ratio to transformers, and whether the greedy
tokens equal transformers'. ``--no_transformers`` leaves transformers out (its OpenMP threads
spin on a shared machine) and compares with the first engine (the baseline when given).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

from benchmarks.roofline import (  # noqa: E402
    _smollm2_dir,
    make_prompts,
    timer,
    transformers_engine,
)


def jax_engine(package: str, model_dir: str):
    """A greedy ``run(prompts, n)`` on ``package``'s JaxSampler (fp32) of ``model_dir``."""
    models = importlib.import_module(f"{package}.models")
    sampling = importlib.import_module(f"{package}.sampling")
    sampler_mod = importlib.import_module(f"{package}.sampling.jax_sampler")
    config, params = models.load_hf(model_dir, jnp.float32)
    sampler = sampler_mod.JaxSampler(config, params, compute_dtype=jnp.float32)

    def run(prompts, n):
        sp = sampling.SamplingParams(temperature=0.0, max_new_tokens=n)
        return [tuple(c.token_ids) for c in sampler.generate(prompts, sp)]

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="", help="package name of the baseline tree")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch_threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no_transformers", action="store_true")
    a = p.parse_args(argv)
    model_dir = _smollm2_dir()
    engines = {}
    if not a.no_transformers:
        engines["transformers"] = transformers_engine(model_dir, a.torch_threads)
    if a.base:
        engines["before"] = jax_engine(a.base, model_dir)
    engines["after"] = jax_engine("advgame_jax", model_dir)
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    prompts = make_prompts(vocab, a.batch, a.prompt_len)
    tokens = {k: e(prompts, a.new_tokens) for k, e in engines.items()}  # warm-up + tokens
    for e in engines.values():
        e(prompts, 1)
    dec = {k: [] for k in engines}
    for _ in range(a.repeats):
        for k, e in engines.items():
            t1 = timer(lambda e=e: e(prompts, 1))
            tn = timer(lambda e=e: e(prompts, a.new_tokens))
            dec[k].append((tn[0] - t1[0], tn[1] - t1[1], t1[0], t1[1]))
    steps = a.new_tokens - 1
    med = {k: [statistics.median(x[i] for x in v) for i in range(4)] for k, v in dec.items()}
    print(f"decode, batch {a.batch}, prompt {a.prompt_len}, {a.new_tokens} new, greedy fp32")
    ref = next(iter(engines))
    print(
        f"| engine | wall s | CPU s | CPU ms/step | x {ref} (CPU) | t(1) wall / CPU s "
        f"| same tokens as {ref} |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, (w, c, w1, c1) in med.items():
        ratio = med[ref][1] / c
        same = tokens[k] == tokens[ref]
        print(
            f"| {k} | {w:.2f} | {c:.2f} | {c / steps * 1e3:.1f} | {ratio:.2f} "
            f"| {w1:.2f} / {c1:.2f} | {same} |"
        )
    print(json.dumps({"rounds": dec, "median": med, "load": os.getloadavg()}))
    return med


if __name__ == "__main__":
    main()
