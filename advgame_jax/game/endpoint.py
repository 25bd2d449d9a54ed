"""``EndpointBackend``: judge prompts sent to OpenAI-compatible servers (``/v1/chat/completions``).

Standard library only (``urllib`` + a ``ThreadPoolExecutor``). Requests of one batch run
concurrently; each attempt goes to the next endpoint round-robin, with a per-attempt socket
timeout. Timeouts, connection errors, HTTP 429/5xx and malformed JSON bodies are retried up
to ``max_retries`` times with exponential backoff and seeded jitter
(``backoff_s · 2^attempt · (1 + U[0, 1))``, capped at ``max_backoff_s``); other HTTP errors
are not retried. A request that still fails returns None and never raises.

Fault kinds counted (cumulative, ``fault_counts()``): ``timeout``, ``connection``,
``http_5xx``, ``http_429``, ``http_4xx``, ``malformed_json`` (per failed attempt),
``retries`` (re-sent attempts) and ``failed_requests`` (requests that returned None).

``check_endpoints()`` (call it at start-up) GETs ``<base>/models`` on each endpoint and
raises ``JudgeEndpointError`` naming every unreachable URL.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Optional, Sequence

from advgame_jax.game.judge import FaultCounter


class JudgeEndpointError(RuntimeError):
    """A judge endpoint cannot be reached or is misconfigured."""


class _Malformed(Exception):
    pass


class EndpointBackend:
    """Concurrent, retrying client of one or more OpenAI-compatible chat endpoints.

    endpoints: base URLs such as ``http://host:8000/v1``; model: the served model name.
    api_key: sent as ``Authorization: Bearer`` when given (never logged).
    timeout_s: per-attempt socket timeout; max_retries: re-sends after the first attempt.
    concurrency: worker threads per batch. temperature / max_tokens: decoding of the judge.
    seed: seeds the backoff jitter. sleep: injectable for tests.
    """

    def __init__(self, endpoints: Sequence[str], model: str, *, api_key: Optional[str] = None,
                 timeout_s: float = 120.0, max_retries: int = 3, concurrency: int = 32,
                 temperature: float = 0.0, max_tokens: int = 8192, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, seed: int = 0,
                 sleep: Callable[[float], None] = time.sleep):
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e]
        endpoints = [str(e).rstrip("/") for e in endpoints]
        if not endpoints:
            raise JudgeEndpointError("judge endpoints: expected at least one base URL such as "
                                     "http://host:8000/v1")
        for e in endpoints:
            if not e.startswith(("http://", "https://")):
                raise JudgeEndpointError(f"judge endpoint {e!r}: expected an http(s):// base URL")
        if not model:
            raise JudgeEndpointError("judge model: expected the model name served at the endpoints")
        if timeout_s <= 0 or max_retries < 0 or concurrency < 1:
            raise JudgeEndpointError(f"judge endpoint options: expected timeout_s > 0, max_retries "
                                     f">= 0, concurrency >= 1; got {timeout_s}, {max_retries}, {concurrency}")
        self.endpoints = tuple(endpoints)
        self.model = model
        self._api_key = api_key or None
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._next = itertools.count()
        self._faults = FaultCounter()

    def __repr__(self) -> str:
        return f"EndpointBackend(endpoints={self.endpoints}, model={self.model!r})"

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return h

    def check_endpoints(self) -> None:
        """Raise ``JudgeEndpointError`` naming each endpoint that does not answer ``GET /models``."""
        bad = []
        for base in self.endpoints:
            url = f"{base}/models"
            try:
                req = urllib.request.Request(url, headers=self._headers(), method="GET")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    json.loads(resp.read().decode("utf-8"))
            except Exception as err:  # any failure means the endpoint is not usable
                bad.append(f"{url} ({type(err).__name__}: {err})")
        if bad:
            raise JudgeEndpointError("judge endpoint unreachable: " + "; ".join(bad) +
                                     ". Expected an OpenAI-compatible server (check "
                                     "config.judge.endpoints and that the server is up)")

    def _backoff(self, attempt: int) -> float:
        with self._lock:
            jitter = self._rng.random()
        return min(self.max_backoff_s, self.backoff_s * (2 ** attempt) * (1 + jitter))

    def _attempt(self, prompt: str) -> str:
        base = self.endpoints[next(self._next) % len(self.endpoints)]
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": self.temperature, "max_tokens": self.max_tokens}).encode()
        req = urllib.request.Request(f"{base}/chat/completions", data=body, headers=self._headers(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            raw = resp.read()
        try:
            content = json.loads(raw.decode("utf-8"))["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise _Malformed(str(err)) from None
        if not isinstance(content, str):
            raise _Malformed("message content is not a string")
        return content

    def _request(self, prompt: str) -> Optional[str]:
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._faults.add("retries")
            try:
                return self._attempt(prompt)
            except urllib.error.HTTPError as err:
                code = err.code
                kind = "http_5xx" if code >= 500 else "http_429" if code == 429 else "http_4xx"
                self._faults.add(kind)
                if kind == "http_4xx":
                    break
            except _Malformed:
                self._faults.add("malformed_json")
            except (TimeoutError, socket.timeout):
                self._faults.add("timeout")
            except urllib.error.URLError as err:
                timed_out = isinstance(err.reason, (TimeoutError, socket.timeout))
                self._faults.add("timeout" if timed_out else "connection")
            except Exception:  # e.g. a connection reset mid-body: still a transport fault
                self._faults.add("connection")
            if attempt < self.max_retries:
                self._sleep(self._backoff(attempt))
        self._faults.add("failed_requests")
        return None

    def complete(self, prompts: Sequence[str]) -> list[Optional[str]]:
        """One answer per prompt (None where every attempt failed), in order."""
        if not prompts:
            return []
        workers = min(self.concurrency, len(prompts))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self._request, prompts))

    def fault_counts(self) -> dict[str, int]:
        return self._faults.snapshot()
