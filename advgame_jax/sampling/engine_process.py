"""Offloaded vLLM engines: one process per engine, started and supervised by the trainer (or
started by the user and connected to), and the ``Sampler`` the game uses to talk to one.

Engine side (``python -m advgame_jax.sampling.engine_process --spec spec.json``): builds a
``VllmSampler`` with the ``OrbaxWeightLoader`` worker extension (``weight_sync``), listens on
a ``multiprocessing.connection`` socket (HMAC-authenticated with a key from the environment,
never from the command line) and serves requests one at a time: ``generate``, ``load`` (swap
in a committed sync checkpoint), ``health``, ``shutdown``. Because requests are served
serially, generation is paused while weights are swapped: a ``load`` starts after the previous
``generate`` returned and the next ``generate`` sees only the new weights. Each reply to
``generate`` carries the weights version it ran with. A spawned engine exits when its trainer
does (it watches its stdin pipe), so a killed trainer never leaves engines holding devices.

Trainer side (``EngineClient`` / ``RemoteSampler``): ``EngineClient.spawn`` starts the process
with the engine's devices in ``CUDA_VISIBLE_DEVICES``, waits for its ready file (with a
deadline, watching the process), then every request has a deadline too: a dead engine or a
timeout raises ``EngineError`` naming the engine (role, pid / address, exit code, log file),
never a hang. ``EngineClient.connect`` attaches to an engine a user started with the same
module (``--host/--port`` and ``--authkey-env``).
"""

from __future__ import annotations

from advgame_jax.errors import UserError
import argparse
import dataclasses
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client, Listener
from typing import Any, Optional, Sequence

from advgame_jax.sampling.base import Completion, SamplingParams

AUTHKEY_ENV = "ADVGAME_ENGINE_AUTHKEY"


class EngineError(UserError, RuntimeError):
    """An offloaded engine died, timed out, refused a request or answered with an error; the
    message names the engine (role, pid or address) and, for a spawned one, its log file."""


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything an engine process needs to start (written as JSON for the child)."""

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
    port: int = 0  # 0: any free port (reported in the ready file)
    ready_file: str = ""


# ---------------------------------------------------------------------------- engine side
def _build_sampler(spec: EngineSpec):
    from advgame_jax.sampling.vllm_sampler import VllmSampler

    kw: dict[str, Any] = dict(worker_extension_cls="advgame_jax.sampling.weight_sync.OrbaxWeightLoader",
                              tensor_parallel_size=spec.tensor_parallel_size,
                              enforce_eager=spec.enforce_eager)
    if spec.gpu_memory_utilization > 0:
        kw["gpu_memory_utilization"] = spec.gpu_memory_utilization
    return VllmSampler(spec.hf_dir, tokenizer=None, dtype=spec.dtype,
                       kv_cache_memory_bytes=spec.kv_cache_bytes or None,
                       max_model_len=spec.max_model_len or None,
                       multiprocessing=spec.tensor_parallel_size > 1, seed=spec.seed, **kw)


def _serve(spec: EngineSpec, authkey: bytes) -> None:
    listener = Listener((spec.host, spec.port), authkey=authkey)
    sampler = _build_sampler(spec)
    version: Optional[int] = None
    if spec.ready_file:
        from advgame_jax.fsutil import atomic_write_text

        host, port = listener.address
        atomic_write_text(spec.ready_file, json.dumps(
            {"host": host, "port": port, "pid": os.getpid()}) + "\n", mode=0o600)
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError):
            continue  # a client that failed authentication or went away
        while True:
            try:
                op, payload = conn.recv()
            except (EOFError, OSError):
                break
            try:
                if op == "health":
                    result: Any = {"version": version, "pid": os.getpid(), "role": spec.role}
                elif op == "generate":
                    prompts, sp = payload
                    outs = sampler.generate(prompts, SamplingParams(**sp))
                    result = {"version": version, "completions": [
                        (c.token_ids, c.logprobs, c.finish_reason) for c in outs]}
                elif op == "load":
                    version = sampler.load_sync_checkpoint(payload)
                    result = version
                elif op == "shutdown":
                    conn.send(("ok", None))
                    sampler.close()
                    return
                else:
                    raise ValueError(f"unknown request {op!r}")
                conn.send(("ok", result))
            except Exception as e:  # reported to the trainer, the engine keeps serving
                conn.send(("error", f"{type(e).__name__}: {e}"))


def _exit_when_stdin_closes() -> None:
    def watch():
        try:
            while sys.stdin.buffer.read(1):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="advgame_jax offloaded vLLM engine")
    ap.add_argument("--spec", required=True, help="JSON file with EngineSpec fields")
    ap.add_argument("--authkey-env", default=AUTHKEY_ENV,
                    help="environment variable holding the connection key")
    ap.add_argument("--exit-with-stdin", action="store_true",
                    help="exit when stdin closes (set by the trainer that spawned this engine)")
    args = ap.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"  # see EngineClient.spawn; also for user-started engines
    with open(args.spec, encoding="utf-8") as f:
        spec = EngineSpec(**json.load(f))
    key = os.environ.get(args.authkey_env, "")
    if not key:
        raise SystemExit(f"engine_process: environment variable {args.authkey_env} is empty; "
                         f"expected the connection key the trainer will use")
    if args.exit_with_stdin:
        _exit_when_stdin_closes()
    if spec.tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # os._exit: the stdin watcher thread must not block interpreter shutdown.
    try:
        _serve(spec, key.encode())
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------- trainer side
class EngineClient:
    """A connection to one engine, with deadlines and liveness checks on every request."""

    def __init__(self, name: str, address, authkey: bytes, *, proc=None, log_path: str = "",
                 request_timeout_s: float = 3600.0):
        self.name, self.address, self.proc, self.log_path = name, address, proc, log_path
        self.request_timeout_s = float(request_timeout_s)
        self._authkey, self._conn = authkey, None
        self._ready_file, self._startup_deadline = "", 0.0
        if address is not None:
            self._connect()

    def _connect(self) -> None:
        try:
            self._conn = Client(tuple(self.address), authkey=self._authkey)
        except (OSError, EOFError) as e:
            raise EngineError(f"{self._who()}: cannot connect ({e})") from None

    def wait_ready(self) -> None:
        """For a spawned engine: wait for its ready file (startup deadline), then connect."""
        if self._conn is not None:
            return
        while not os.path.isfile(self._ready_file):
            dead = self._dead(" while starting")
            if dead:
                raise EngineError(dead)
            if time.monotonic() > self._startup_deadline:
                self.proc.kill()
                raise EngineError(f"{self._who()}: not ready within the startup timeout"
                                  f"{self._log()}")
            time.sleep(0.2)
        with open(self._ready_file, encoding="utf-8") as f:
            info = json.load(f)
        self.address = (info["host"], info["port"])
        self._connect()

    def _who(self) -> str:
        where = f"pid {self.proc.pid}" if self.proc is not None else "address"
        addr = f"{self.address[0]}:{self.address[1]}" if self.address else "starting"
        return f"{self.name} engine ({where}, {addr})"

    def _log(self) -> str:
        return f"; its log: {self.log_path}" if self.log_path else ""

    def _dead(self, context: str = "") -> Optional[str]:
        if self.proc is not None and self.proc.poll() is not None:
            return f"{self._who()} exited with code {self.proc.returncode}{context}{self._log()}"
        return None

    def request(self, op: str, payload: Any = None, *, timeout_s: Optional[float] = None):
        timeout_s = self.request_timeout_s if timeout_s is None else timeout_s
        self.wait_ready()
        dead = self._dead()
        if dead:
            raise EngineError(dead)
        try:
            self._conn.send((op, payload))
            deadline = time.monotonic() + timeout_s
            while not self._conn.poll(0.2):
                dead = self._dead(f" during '{op}'")
                if dead:
                    raise EngineError(dead)
                if time.monotonic() > deadline:
                    raise EngineError(f"{self._who()}: no answer to '{op}' within "
                                      f"{timeout_s:.0f} s{self._log()}")
            status, result = self._conn.recv()
        except (EOFError, OSError) as e:
            time.sleep(0.5)  # let the exit code land
            raise EngineError(self._dead(f" during '{op}'")
                              or f"{self._who()}: connection lost during '{op}' ({e!r})"
                              f"{self._log()}") from None
        if status != "ok":
            raise EngineError(f"{self._who()}: '{op}' failed: {result}{self._log()}")
        return result

    @classmethod
    def spawn(cls, spec: EngineSpec, run_dir: str, *, startup_timeout_s: float = 900.0,
              request_timeout_s: float = 3600.0) -> "EngineClient":
        """Start an engine process for ``spec``; files (spec, ready file, log) in ``run_dir``.

        Returns at once (start several engines in parallel); the first request waits for
        readiness, up to ``startup_timeout_s``.
        """
        from advgame_jax import fsutil

        fsutil.make_owned_dir(run_dir, "engine_run")
        ready = os.path.join(run_dir, f"{spec.role}.ready.json")
        if os.path.exists(ready):
            os.unlink(ready)
        spec = dataclasses.replace(spec, ready_file=ready)
        spec_file = os.path.join(run_dir, f"{spec.role}.spec.json")
        fsutil.atomic_write_text(spec_file, json.dumps(dataclasses.asdict(spec)), mode=0o600)
        key = secrets.token_hex(16)
        env = dict(os.environ, **{AUTHKEY_ENV: key})
        env.pop("XLA_FLAGS", None)  # the engine does not need the trainer's virtual devices
        # JAX only reads sync checkpoints to host memory here: it must never take (and, by
        # default, preallocate 75% of) the engine's GPUs.
        env["JAX_PLATFORMS"] = "cpu"
        if spec.devices:
            env["CUDA_VISIBLE_DEVICES"] = spec.devices
        log_path = os.path.join(run_dir, f"{spec.role}.log")
        log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "advgame_jax.sampling.engine_process", "--spec", spec_file,
             "--exit-with-stdin"], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True)
        log.close()
        client = cls(spec.role, None, key.encode(), proc=proc, log_path=log_path,
                     request_timeout_s=request_timeout_s)
        client._ready_file = ready
        client._startup_deadline = time.monotonic() + startup_timeout_s
        return client

    @classmethod
    def connect(cls, name: str, address: str, authkey_env: str, *,
                request_timeout_s: float = 3600.0) -> "EngineClient":
        """Attach to a user-started engine at ``host:port`` (key in env var ``authkey_env``)."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise EngineError(f"{name} engine address {address!r}: expected 'host:port'")
        key = os.environ.get(authkey_env or AUTHKEY_ENV, "")
        if not key:
            raise EngineError(f"{name} engine: environment variable {authkey_env or AUTHKEY_ENV} "
                              f"is empty; expected the key the engine was started with")
        return cls(name, (host, int(port)), key.encode(), request_timeout_s=request_timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Shut down a spawned engine (politely, then by signal); just disconnect otherwise."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                if self._conn is None:  # still starting: nothing to say goodbye to
                    raise EngineError("not connected")
                self.request("shutdown", timeout_s=timeout_s)
            except EngineError:
                pass
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout_s)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass


class RemoteSampler:
    """``Sampler`` over an offloaded engine; completions carry ``weights_version``."""

    def __init__(self, client: EngineClient, *, tokenizer=None, load_timeout_s: float = 900.0):
        self.client, self.tokenizer = client, tokenizer
        self.load_timeout_s = float(load_timeout_s)
        self.weights_version: Optional[int] = client.request("health", timeout_s=60)["version"]

    def generate(self, prompt_token_ids: Sequence[Sequence[int]],
                 params: SamplingParams) -> list[Completion]:
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        out = self.client.request("generate", (prompts, dataclasses.asdict(params)))
        version = out["version"]
        result = []
        for ids, lps, reason in out["completions"]:
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""
            result.append(Completion(token_ids=tuple(ids), text=text, logprobs=tuple(lps),
                                     finish_reason=reason, weights_version=version))
        return result

    def update_weights(self, params: Any = None, *, checkpoint_path: Optional[str] = None,
                       version: Optional[int] = None) -> int:
        """Make the engine load the committed sync checkpoint at ``checkpoint_path``."""
        if params is not None or checkpoint_path is None:
            raise ValueError("RemoteSampler.update_weights: pass checkpoint_path (a committed "
                             "sync checkpoint); in-memory params cannot reach another process")
        loaded = self.client.request("load", os.path.abspath(checkpoint_path),
                                     timeout_s=self.load_timeout_s)
        if version is not None and loaded != version:
            raise EngineError(f"{self.client._who()}: loaded weights version {loaded}, "
                              f"expected {version}")
        self.weights_version = loaded
        return loaded

    def close(self) -> None:
        self.client.close()


if __name__ == "__main__":
    main()
