"""Offloaded vLLM engines as vLLM's own OpenAI-compatible servers, and the ``Sampler`` the game
uses to talk to one over HTTP.

The engine is vLLM's standard server with this project's worker extension (the command a user
runs on another host; ``server_command`` builds it, docs/sampling.md shows it)::

    VLLM_SERVER_DEV_MODE=1 VLLM_API_KEY=<key> python -m vllm.entrypoints.openai.api_server \\
        --model <hf_dir> --enable-scale-out \\
        --worker-extension-cls advgame_jax.sampling.weight_sync.OrbaxWeightLoader \\
        --dtype bfloat16 --max-model-len 4096 --host 0.0.0.0 --port 8100

vLLM interfaces used (vLLM 0.32): generation on ``POST /inference/v1/generate`` (token ids in,
token ids out, the sampled tokens' log-probs, and the weight-version spans of every
completion; enabled by ``--enable-scale-out``); the weight refresh on the development routes
(``VLLM_SERVER_DEV_MODE=1``): ``POST /pause?mode=wait`` (in-flight requests finish, new ones
wait), ``POST /collective_rpc`` with method ``advgame_load_sync`` (every worker reads the
committed sync checkpoint itself, ``weight_sync.OrbaxWeightLoader``), ``POST
/reset_prefix_cache``, ``POST /update_weight_version`` (the label vLLM stamps on every token
sampled from then on), ``POST /resume``; ``GET /weight_info``, ``GET /health`` and ``GET
/v1/models`` (``max_model_len``). vLLM checks the API key on ``/v1`` and ``/inference`` only:
the development routes are open to anyone who reaches the port, so bind engines to loopback or
a private network.

Trainer side: ``EngineClient.spawn`` starts that command in its own session (a signal to the
trainer's process group does not reach it; the trainer stops it after its last checkpoint;
it gets SIGTERM if the trainer dies), with the engine's devices in ``CUDA_VISIBLE_DEVICES``
and a fresh API key in its environment; ``EngineClient.connect`` attaches to a user-started
one. Every request has a deadline; a dead engine, a timeout or an error answer raises
``EngineError`` naming the engine (role, pid or address) and, when spawned, its log file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Sequence

from advgame_jax import net
from advgame_jax.errors import UserError
from advgame_jax.sampling.base import (
    Completion,
    SamplerCounters,
    SamplingParams,
    SyncCheckpoint,
    WeightsRef,
    over_budget_completions,
    wrong_ref,
)

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class EngineError(UserError, RuntimeError):
    """An offloaded engine died, timed out, refused a request or answered with an error; the
    message names the engine (role, pid or address) and, for a spawned one, its log file."""


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything a spawned engine needs (the server's command line and environment)."""

    role: str
    hf_dir: str
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.0  # 0: vLLM's default (ignored on CPU)
    max_model_len: int = 0
    kv_cache_bytes: int = 0  # 0: let vLLM size the KV cache from gpu_memory_utilization
    enforce_eager: bool = False
    seed: int = 0
    devices: str = ""  # CUDA_VISIBLE_DEVICES for the engine; "" = inherit
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port


def server_command(spec: EngineSpec, port: int) -> list[str]:
    """vLLM's OpenAI server command for ``spec`` (the API key travels in the environment)."""
    from advgame_jax.sampling.weight_sync import EXTENSION

    has_tokenizer = any(
        os.path.isfile(os.path.join(spec.hf_dir, f))
        for f in ("tokenizer.json", "tokenizer_config.json")
    )
    cmd = [
        sys.executable,
        "-m",
        SERVER_MODULE,
        "--model",
        spec.hf_dir,
        "--enable-scale-out",
        "--worker-extension-cls",
        EXTENSION,
        "--dtype",
        spec.dtype,
        "--seed",
        str(spec.seed),
        "--host",
        spec.host,
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(spec.tensor_parallel_size),
        "--served-model-name",
        spec.role,
        "--disable-uvicorn-access-log",
    ]
    if spec.max_model_len:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if spec.kv_cache_bytes:
        cmd += ["--kv-cache-memory-bytes", str(spec.kv_cache_bytes)]
    if spec.gpu_memory_utilization > 0:
        cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.enforce_eager:
        cmd.append("--enforce-eager")
    if not has_tokenizer:
        cmd.append("--skip-tokenizer-init")
    return cmd


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# The spawned engine's first step, before it becomes vLLM's server: ask the kernel for SIGTERM
# when the trainer dies (Linux; kept across exec), then exec the server command. Done in the
# child's own interpreter, not in a preexec_fn (unsafe in the threaded trainer).
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n"
)


class EngineClient:
    """HTTP requests to one engine server, with deadlines and liveness checks on every one."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        api_key: str = "",
        proc=None,
        log_path: str = "",
        request_timeout_s: float = 3600.0,
        startup_timeout_s: float = 900.0,
    ):
        self.name, self.url, self.proc, self.log_path = name, url.rstrip("/"), proc, log_path
        self._startup_deadline, self._ready = time.monotonic() + startup_timeout_s, proc is None
        self._http = net.Client(
            [self.url],
            net.ClientOptions(api_key or None, request_timeout_s, 0, max_connections=256),
            field=f"config.{name}.engine.address",
        )

    def _error(self, message: str) -> EngineError:
        """An error naming the engine (role, pid or address) and, when spawned, its log."""
        where = f"pid {self.proc.pid}, " if self.proc is not None else ""
        log = f"; its log: {self.log_path}" if self.log_path else ""
        return EngineError(f"{self.name} engine ({where}{self.url}): {message}{log}")

    def _dead(self, context: str = "") -> Optional[EngineError]:
        if self.proc is not None and self.proc.poll() is not None:
            return self._error(f"exited with code {self.proc.returncode}{context}")
        return None

    def request(
        self, method: str, path: str, payload: Any = None, *, timeout_s: Optional[float] = None
    ) -> Any:
        """``method path`` with a JSON body; the decoded answer (``None`` for an empty one).
        A spawned engine's first request waits until ``/health`` answers (startup deadline)."""
        while not self._ready:
            if (dead := self._dead(" while starting")) is not None:
                raise dead
            if time.monotonic() > self._startup_deadline:
                assert self.proc is not None  # only a spawned engine starts unready
                self.proc.kill()
                raise self._error("not ready within the startup timeout")
            try:
                self._ready = self._http.get("/health", timeout_s=5, count=False) or True
            except net.ClientError:
                time.sleep(0.5)
        try:
            if (dead := self._dead()) is not None:
                raise dead
            return self._http.request(method, path, payload, timeout_s=timeout_s)
        except net.ClientError as e:
            time.sleep(0.2)  # let a dying engine's exit code land
            raise self._dead(f" during '{path}'") or self._error(f"'{path}' failed: {e}") from None

    # ------------------------------------------------------------------ start / attach / stop
    @classmethod
    def spawn(
        cls,
        spec: EngineSpec,
        run_dir: str,
        *,
        startup_timeout_s: float = 900.0,
        request_timeout_s: float = 3600.0,
    ) -> "EngineClient":
        """Start vLLM's server for ``spec``; its log and ``<role>.engine.json`` (pid, URL, log)
        in ``run_dir``. Returns at once; the first request waits for readiness."""
        from advgame_jax import fsutil

        fsutil.make_owned_dir(run_dir, "engine_run")
        port = spec.port or _free_port(spec.host)
        key = secrets.token_hex(16)
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_API_KEY=key)
        env.pop("XLA_FLAGS", None)  # the engine does not need the trainer's virtual devices
        # JAX only reads sync checkpoints to host memory in the engine: it must never take
        # (and, by default, preallocate 75% of) the engine's GPUs.
        env["JAX_PLATFORMS"] = "cpu"
        if spec.tensor_parallel_size == 1:
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # starts faster
        if spec.kv_cache_bytes:  # vLLM's CPU backend sizes its cache from this variable
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, -(-spec.kv_cache_bytes >> 30))))
        if spec.devices:
            env["CUDA_VISIBLE_DEVICES"] = spec.devices
        log_path = os.path.join(run_dir, f"{spec.role}.log")
        log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        cmd = server_command(spec, port)
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *cmd[1:]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        url = f"http://{spec.host}:{port}"
        fsutil.atomic_write_text(
            os.path.join(run_dir, f"{spec.role}.engine.json"),
            json.dumps({"pid": proc.pid, "url": url, "log": log_path}) + "\n",
            mode=0o600,
        )
        return cls(
            spec.role,
            url,
            api_key=key,
            proc=proc,
            log_path=log_path,
            request_timeout_s=request_timeout_s,
            startup_timeout_s=startup_timeout_s,
        )

    @classmethod
    def connect(
        cls, name: str, address: str, api_key_env: str = "", *, request_timeout_s: float = 3600.0
    ) -> "EngineClient":
        """Attach to a user-started engine at ``host:port`` (or an http(s) URL); its API key,
        if it has one, in the environment variable ``api_key_env``."""
        url = address if address.startswith(("http://", "https://")) else f"http://{address}"
        host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise EngineError(f"config.{name}.engine.address={address!r}: expected 'host:port'")
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not key:
            raise EngineError(
                f"config.{name}.engine.authkey_env: environment variable "
                f"{api_key_env} is empty; expected the engine's API key"
            )
        client = cls(name, url, api_key=key, request_timeout_s=request_timeout_s)
        client.request("GET", "/health", timeout_s=30)
        return client

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop a spawned engine (SIGTERM to its session, then SIGKILL); disconnect otherwise.
        A server that died first (killed, crashed) leaves the rest of its session behind
        (vLLM's engine core process): that is killed too, so nothing outlives the run."""
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout_s)
                except (subprocess.TimeoutExpired, OSError):
                    _kill_group(self.proc.pid)
                    self.proc.wait()
            _kill_orphans(self.proc.pid)
        self._http.close()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left


def _kill_orphans(leader_pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL what is left in the process group of a server already reaped, and wait (up to
    ``timeout_s``) until it is gone. A live process with the leader's pid is another process
    that reused it: then the group is not ours."""
    try:
        os.kill(leader_pid, 0)
        return
    except ProcessLookupError:
        pass
    _kill_group(leader_pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(leader_pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def _version(label: Any) -> Optional[int]:
    try:
        return int(label)
    except (TypeError, ValueError):
        return None  # vLLM's "default": never synced


class RemoteSampler:
    """``Sampler`` over an engine server; completions carry the ``weights_version`` vLLM
    stamped on their tokens (the oldest one, if a completion spans several).

    ``prompt_budget``: the longest prompt accepted (default, and at most, the engine's
    ``max_model_len - 1``; the engine's context also bounds prompt + ``max_new_tokens``).
    """

    def __init__(
        self,
        client: EngineClient,
        model_config,
        *,
        tokenizer=None,
        load_timeout_s: float = 900.0,
        max_parallel: int = 64,
        prompt_budget: int = 0,
    ):
        self.client, self.tokenizer = client, tokenizer
        self._model_config_json = json.dumps(model_config.to_hf_dict())
        self.load_timeout_s, self.max_parallel = float(load_timeout_s), int(max_parallel)
        try:
            info = client.request("GET", "/weight_info", timeout_s=60)
        except EngineError as e:
            if client._dead() is not None:
                raise
            raise EngineError(
                f"{e}; an engine must run vLLM's server with "
                f"VLLM_SERVER_DEV_MODE=1 and --enable-scale-out (docs/sampling.md)"
            ) from None
        self.counters = SamplerCounters(weights_version=_version(info.get("weight_version")))
        models = client.request("GET", "/v1/models", timeout_s=60).get("data") or [{}]
        self.max_model_len = int(models[0].get("max_model_len") or 0)
        limits = [b for b in (int(prompt_budget), self.max_model_len - 1) if b > 0]
        self.prompt_budget = min(limits) if limits else 0  # 0: the engine reports no limit
        self._counted = threading.Lock()

    @property
    def weights_version(self) -> Optional[int]:
        """The version the engine labels its tokens with (None: never synced)."""
        return self.counters.weights_version

    def _over_budget(self, ids: list[int], sp: SamplingParams) -> bool:
        budget, ctx = self.prompt_budget or len(ids), self.max_model_len or 1 << 62
        return len(ids) > budget or len(ids) + sp.max_new_tokens > ctx

    def _one(self, ids: list[int], sp: SamplingParams) -> list[Completion]:
        if self._over_budget(ids, sp):
            with self._counted:  # prompts are sent from a thread pool
                self.counters.prompt_too_long += 1  # the game's MAX_LENGTH, counted
            return over_budget_completions(sp.n, self.weights_version)
        # Greedy: one completion, repeated (vLLM refuses n > 1 without sampling).
        n = 1 if sp.temperature == 0 else sp.n
        params: dict[str, Any] = dict(
            n=n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k
        )
        params.update(max_tokens=sp.max_new_tokens, stop_token_ids=list(sp.stop_token_ids))
        params.update(ignore_eos=True, logprobs=0, detokenize=False)
        params.update({} if sp.seed is None else {"seed": sp.seed})
        out = self.client.request(
            "POST", "/inference/v1/generate", {"token_ids": ids, "sampling_params": params}
        )
        result = []
        for ch in sorted(out["choices"], key=lambda c: c["index"]):
            tok = tuple(int(t) for t in ch.get("token_ids") or ())
            lps = tuple(
                float(e["logprob"]) for e in (ch.get("logprobs") or {}).get("content") or ()
            )
            if len(lps) != len(tok):
                raise self.client._error(f"{len(tok)} tokens but {len(lps)} log-probs")
            versions = [_version(span.get("version")) for span in ch.get("weight_versions") or []]
            version = None if None in versions else min(versions, default=None)  # type: ignore[type-var]
            stop = ch.get("finish_reason") == "stop" and bool(tok) and tok[-1] in sp.stop_token_ids
            text = self.tokenizer.decode(tok, skip_special_tokens=True) if self.tokenizer else ""
            finish = "stop" if stop else "length"
            version = version if tok else self.weights_version
            result.append(Completion(tok, text, lps, finish, weights_version=version))
        return result * (sp.n // n)

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[Completion]:
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generate: prompt {i} is empty; expected >= 1 token id")
        if not prompts:
            return []
        with concurrent.futures.ThreadPoolExecutor(min(self.max_parallel, len(prompts))) as ex:
            parts = list(ex.map(lambda p: self._one(p, params), prompts))
        return [c for part in parts for c in part]

    # ------------------------------------------------------------------ the Sampler contract
    def stats(self) -> dict[str, Any]:
        return self.counters.as_dict()

    def load_weights(self, ref: WeightsRef) -> int:
        """Swap in the committed sync checkpoint ``ref`` (``SyncCheckpoint``; in-memory params
        cannot reach another process): pause generation, every worker loads it, reset the
        prefix cache, label the version, resume. Returns the version."""
        if not isinstance(ref, SyncCheckpoint):
            raise wrong_ref(self, ref, SyncCheckpoint)
        from advgame_jax.sampling.weight_sync import read_commit

        path = os.path.abspath(ref.path)
        expected = int(read_commit(path)["version"]) if ref.version is None else int(ref.version)
        c, t, args = self.client, self.load_timeout_s, [path, self._model_config_json]
        c.request("POST", "/pause?mode=wait", timeout_s=t)
        try:
            rpc = {"method": "advgame_load_sync", "args": args, "timeout": t}
            out = c.request("POST", "/collective_rpc", rpc, timeout_s=t)
            loaded = {_version(r) for r in (out or {}).get("results", [])}
            if loaded != {expected}:
                raise c._error(
                    f"workers loaded weights versions {sorted(loaded, key=str)} "
                    f"from {path}, expected {expected}"
                )
            c.request("POST", "/reset_prefix_cache", timeout_s=t)
            c.request("POST", "/update_weight_version", {"new_version": str(expected)}, timeout_s=t)
        finally:
            c.request("POST", "/resume", timeout_s=t)
        return self.counters.loaded(expected)

    def close(self) -> None:
        self.client.close()
