"""Sampler throughput: JaxSampler vs vLLM (when installed) vs transformers' ``generate``.

    python benchmarks/sampler.py                          # defaults below, CPU
    python benchmarks/sampler.py --batch=32 --new_tokens=128 --hidden=512 --layers=8

All engines get the same random Llama checkpoint (written once with transformers), the same
left-padded prompts, greedy decoding and exactly ``--new_tokens`` new tokens per row (no stop
token). Each engine runs in its own subprocess (engines set process-wide thread pools and
CPU bindings that would skew each other), is warmed up once (compilation / graph capture
excluded), then timed ``--repeats`` times; the median gives tokens/s = batch * new_tokens /
seconds, reported with its ratio to transformers. The script also reports whether each engine's greedy tokens equal
transformers' (fp32 ties aside, they should). Results are printed as a table and one JSON line.

Decode roofline (``--roofline``; the GPU size is ``--preset=qwen2.5-1.5b``: Qwen2.5-1.5B
shape, bf16, batch 64, 512 new tokens, prompts of 128 tokens):

    python benchmarks/sampler.py --preset=qwen2.5-1.5b            # on an H100 / H200
    python benchmarks/sampler.py --roofline --layers=2 --hidden=128 # the same path, CPU size

The JAX sampler alone, on random params made in JAX (no checkpoint on disk). Decode time is
t(new_tokens) - t(1) (the prefill and the first token cancel), so decode tokens/s =
batch * (new_tokens - 1) / decode time. The HBM bound of one decode step is the bytes it
must read: every parameter once (the input embedding only for the rows it gathers; a tied
embedding counts once, as the output head) plus the KV cache of every row up to its current
length, 2 * layers * kv_heads * head_dim * bytes per token. Summed over the decode steps and
divided by ``--hbm_gbps`` (H200: 4,800 GB/s spec; 3,670 GB/s measured device copy) that is the
fastest possible decode; the script prints the fraction of it achieved (target >= 50%).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=32, help="longest prompt; others shorter")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument(
        "--engines",
        default="jax,transformers,vllm",
        help="comma-separated subset of jax,transformers,vllm",
    )
    p.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--torch_threads",
        type=int,
        default=1,
        help="torch intra-op threads for transformers (vLLM's CPU backend uses 1)",
    )
    p.add_argument("--intermediate", type=int, default=0, help="MLP width; 0 = 4 * hidden")
    p.add_argument("--head_dim", type=int, default=0, help="0 = hidden / heads")
    p.add_argument("--tied", action="store_true", help="tie input and output embeddings")
    p.add_argument(
        "--roofline",
        action="store_true",
        help="JAX sampler decode tokens/s vs the HBM-bandwidth bound (docstring)",
    )
    p.add_argument(
        "--preset",
        default="",
        choices=["", "qwen2.5-1.5b"],
        help="qwen2.5-1.5b: the GPU-size roofline run (docstring)",
    )
    p.add_argument(
        "--hbm_gbps",
        type=float,
        default=4800.0,
        help="HBM bandwidth for the bound (H200 spec 4800; H100 SXM 3350)",
    )
    p.add_argument(
        "--filter_bench",
        action="store_true",
        help="time top-p/top-k token selection: candidate set vs a full sort",
    )
    p.add_argument("--run_engine", default=None, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--model_dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


PRESETS = {
    # Qwen2.5-1.5B: vocab 151936, d 1536, MLP 8960, 28 layers, 12 heads / 2 KV heads of 128,
    # tied embeddings, q/k/v biases; run in bf16 at batch 64, 512 new tokens, 128-token prompts.
    "qwen2.5-1.5b": dict(
        vocab=151936,
        hidden=1536,
        intermediate=8960,
        layers=28,
        heads=12,
        kv_heads=2,
        head_dim=128,
        tied=True,
        batch=64,
        new_tokens=512,
        prompt_len=128,
        compute_dtype="bfloat16",
        roofline=True,
        repeats=3,
    ),
}


def _roofline_config(a):
    from advgame_jax.models import ModelConfig

    return ModelConfig(
        model_type="qwen2" if a.tied else "llama",
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate or 4 * a.hidden,
        num_layers=a.layers,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        head_dim=a.head_dim or a.hidden // a.heads,
        max_position_embeddings=max(4096, 2 * (a.prompt_len + a.new_tokens)),
        tie_word_embeddings=a.tied,
        qkv_bias=a.tied,
    )


def decode_bytes(config, a, itemsize: int) -> float:
    """Bytes the decode steps 2..new_tokens must read (HBM bound; module docstring)."""
    import jax

    from advgame_jax.models import param_shapes

    shapes = param_shapes(config, jax.numpy.float32)
    n_params = sum(int(np_prod(x.shape)) for x in jax.tree.leaves(shapes))
    embed = config.vocab_size * config.hidden_size
    # Non-tied: the input table is gathered (batch rows), the output head read whole.
    per_step_params = (n_params - (0 if config.tie_word_embeddings else embed)) * itemsize
    per_step_params += a.batch * config.hidden_size * itemsize  # gathered embedding rows
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
    prompt_lens = [len(p) for p in _prompts(a)]
    total = 0.0
    for t in range(1, a.new_tokens):  # step t reads the prompt + t tokens of every row
        total += per_step_params + kv_per_token * sum(n + t for n in prompt_lens)
    return total


def np_prod(shape):
    out = 1
    for d in shape:
        out *= int(d)
    return out


def roofline(a):
    """JAX sampler decode tokens/s and the fraction of the HBM-bandwidth bound."""
    import jax
    import jax.numpy as jnp

    from advgame_jax.models import init_params
    from advgame_jax.sampling import SamplingParams
    from advgame_jax.sampling.jax_sampler import JaxSampler

    config = _roofline_config(a)
    dtype = jnp.dtype(a.compute_dtype)
    params = init_params(config, jax.random.key(0), dtype)
    sampler = JaxSampler(
        config,
        params,
        tokenizer=None,
        compute_dtype=dtype,
        max_batch_size=a.batch,
        min_batch_bucket=a.batch,
        min_new_bucket=a.new_tokens,
        copy_params=False,
    )
    prompts = _prompts(a)
    full = SamplingParams(temperature=0.0, max_new_tokens=a.new_tokens)
    one = SamplingParams(temperature=0.0, max_new_tokens=1)
    _, t_full, times_full = _time(lambda: sampler.generate(prompts, full), a.repeats)
    _, t_one, times_one = _time(lambda: sampler.generate(prompts, one), a.repeats)
    decode_s = max(t_full - t_one, 1e-9)
    tok_s = a.batch * (a.new_tokens - 1) / decode_s
    nbytes = decode_bytes(config, a, dtype.itemsize)
    bound_s = nbytes / (a.hbm_gbps * 1e9)
    result = {
        "device": str(jax.devices()[0].device_kind),
        "batch": a.batch,
        "new_tokens": a.new_tokens,
        "prompt_len": a.prompt_len,
        "dtype": dtype.name,
        "params_b": round(sum(x.size for x in jax.tree.leaves(params)) / 1e9, 4),
        "t_full_s": round(t_full, 4),
        "t_prefill_plus_one_s": round(t_one, 4),
        "decode_s": round(decode_s, 4),
        "decode_tok_per_s": round(tok_s, 1),
        "decode_bytes_gb": round(nbytes / 1e9, 3),
        "hbm_gbps": a.hbm_gbps,
        "bound_s": round(bound_s, 4),
        "fraction_of_hbm_bound": round(bound_s / decode_s, 4),
        "times_full_s": times_full,
        "times_one_s": times_one,
    }
    print(
        f"JAX sampler decode on {result['device']}: {tok_s:,.0f} tok/s "
        f"(batch {a.batch}, {a.new_tokens} new, {dtype.name}); {nbytes / 1e9:.1f} GB read "
        f"at {a.hbm_gbps:.0f} GB/s = {bound_s:.3f} s bound vs {decode_s:.3f} s measured: "
        f"{100 * bound_s / decode_s:.1f}% of the HBM bound"
    )
    print(json.dumps(result))
    return result


def filter_bench(a):
    """One filtered token selection over [batch, vocab] logits: ``decode.select_tokens``
    (lax.top_k candidates) vs the same rule by a full descending sort (the baseline), same
    process, medians of ``--repeats`` (after a warm-up)."""
    import jax
    import jax.numpy as jnp

    from advgame_jax.sampling.decode import select_tokens

    def sort_select(logits, temperature, top_p, top_k, keys):
        scaled = logits / temperature[:, None]
        desc = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
        rank = jnp.arange(scaled.shape[-1])[None, :]
        keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
        n = jnp.maximum(keep.sum(-1), 1)
        cut = jnp.take_along_axis(desc, (n - 1)[:, None], axis=-1)
        masked = jnp.where(scaled >= cut, scaled, -jnp.inf)
        return jax.vmap(jax.random.categorical)(keys, masked)

    b, v = a.batch, a.vocab
    logits = jax.random.normal(jax.random.key(0), (b, v)) * 3
    args = (
        logits,
        jnp.full((b,), 0.7),
        jnp.full((b,), 0.9),
        jnp.zeros((b,), jnp.int32),
        jax.vmap(jax.random.key)(jnp.arange(b)),
    )
    new = jax.jit(lambda *x: select_tokens(*x, use_filter=True)[0])
    base = jax.jit(sort_select)
    t_new = _time(lambda: jax.block_until_ready(new(*args)), a.repeats)[1]
    t_base = _time(lambda: jax.block_until_ready(base(*args)), a.repeats)[1]
    res = {
        "batch": b,
        "vocab": v,
        "device": jax.devices()[0].device_kind,
        "candidates_ms": round(1e3 * t_new, 3),
        "full_sort_ms": round(1e3 * t_base, 3),
        "speedup": round(t_base / t_new, 2),
    }
    print(json.dumps(res))
    return res


def _make_model(path, a):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=4 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # wider than the default init so greedy paths are not degenerate
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return model.eval()


def _prompts(a):
    import numpy as np

    rng = np.random.default_rng(0)
    lens = np.linspace(max(1, a.prompt_len // 4), a.prompt_len, a.batch).astype(int)
    return [[int(t) for t in rng.integers(3, a.vocab, n)] for n in lens]


def _time(fn, repeats):
    out = fn()  # warm-up: compilation, graph capture, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times


def _transformers(path, prompts, a):
    import torch
    from transformers import LlamaForCausalLM

    torch.set_grad_enabled(False)
    torch.set_num_threads(a.torch_threads)
    model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, a.compute_dtype)).eval()
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1

    def run():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=a.new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return [tuple(int(t) for t in row[width:]) for row in out]

    return run


def _jax(path, prompts, a):
    import jax.numpy as jnp

    from advgame_jax.sampling import SamplingParams
    from advgame_jax.sampling.jax_sampler import JaxSampler

    sampler = JaxSampler.from_hf_dir(path, tokenizer=None, compute_dtype=jnp.dtype(a.compute_dtype))
    sp = SamplingParams(temperature=0.0, max_new_tokens=a.new_tokens)
    return lambda: [c.token_ids for c in sampler.generate(prompts, sp)]


def _vllm(path, prompts, a):
    from advgame_jax.sampling import SamplingParams
    from advgame_jax.sampling.vllm_sampler import VllmSampler

    sampler = VllmSampler(
        path,
        dtype=a.compute_dtype,
        kv_cache_memory_bytes=256 << 20,
        max_model_len=max(512, a.prompt_len + a.new_tokens),
    )
    sp = SamplingParams(temperature=0.0, max_new_tokens=a.new_tokens)
    return lambda: [c.token_ids for c in sampler.generate(prompts, sp)]


def _child(a):
    """Run one engine on ``a.model_dir`` and print its JSON result (last stdout line)."""
    runner = {"transformers": _transformers, "jax": _jax, "vllm": _vllm}[a.run_engine]
    out, median, times = _time(runner(a.model_dir, _prompts(a), a), a.repeats)
    print(json.dumps({"median_s": median, "times_s": times, "tokens": out}))


def main():
    a = _args()
    if a.preset:
        for k, v in PRESETS[a.preset].items():
            setattr(a, k, v)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.roofline:
        return roofline(a)
    if a.filter_bench:
        return filter_bench(a)
    if a.run_engine:
        return _child(a)
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    import importlib.util

    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        print("vllm not installed: skipping it", file=sys.stderr)
        engines.remove("vllm")
    results = {}
    with tempfile.TemporaryDirectory() as path:
        _make_model(path, a)
        for name in ["transformers"] + [e for e in engines if e != "transformers"]:
            shared = [
                f"--{k}={v}"
                for k, v in vars(a).items()
                if k not in ("engines", "run_engine", "model_dir")
            ]
            argv = [
                sys.executable,
                os.path.abspath(__file__),
                f"--run_engine={name}",
                f"--model_dir={path}",
            ] + shared
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"engine {name} failed (exit {proc.returncode})")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["tokens"] = [tuple(t) for t in r["tokens"]]
            r["tok_per_s"] = a.batch * a.new_tokens / r["median_s"]
            results[name] = r
    ref = results["transformers"]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
        f"batch={a.batch} prompt<={a.prompt_len} new={a.new_tokens} "
        f"model: vocab={a.vocab} d={a.hidden} L={a.layers} H={a.heads}/{a.kv_heads} "
        f"dtype={a.compute_dtype}"
    )
    print(
        f"{'engine':<14}{'median s':>10}{'min s':>8}{'tok/s':>10}{'x transformers':>16}"
        f"{'same tokens':>13}"
    )
    summary = {}
    for name, r in results.items():
        ratio = r["tok_per_s"] / ref["tok_per_s"]
        same = r["tokens"] == ref["tokens"]
        print(
            f"{name:<14}{r['median_s']:>10.3f}{min(r['times_s']):>8.3f}"
            f"{r['tok_per_s']:>10.0f}{ratio:>16.2f}{str(same):>13}"
        )
        summary[name] = {
            "median_s": round(r["median_s"], 4),
            "min_s": round(min(r["times_s"]), 4),
            "tok_per_s": round(r["tok_per_s"], 1),
            "ratio_to_transformers": round(ratio, 3),
            "same_tokens": same,
        }
    args = {k: v for k, v in vars(a).items() if k not in ("run_engine", "model_dir")}
    print(json.dumps({"args": args, "results": summary}))


if __name__ == "__main__":
    main()
