"""``EndpointBackend``: judge prompts sent to OpenAI-compatible servers (``/v1/chat/completions``).

Standard library only (``http.client`` + a ``ThreadPoolExecutor``).

Throughput. The requests of one batch run concurrently across all endpoints (replicas):
at most ``concurrency`` in flight in total and at most ``max_in_flight_per_endpoint`` on any
one endpoint; each attempt goes to the healthy endpoint with the fewest requests in flight
(ties: the one given the fewest requests so far). Health per endpoint: ``unhealthy_after`` consecutive failed attempts mark
it unhealthy for ``unhealthy_cooldown_s``; it is then used only when no endpoint is healthy.

Deadlines. ``timeout_s`` is wall-clock per request, retries and backoff included: every
attempt gets what is left of it, and a watchdog closes the attempt's socket when that runs
out, so a server that trickles its answer one byte at a time cannot stall a request past it.
Timeouts, connection errors, HTTP 429/5xx and malformed JSON bodies are retried up to
``max_retries`` times (while time is left) with exponential backoff and seeded jitter
(``backoff_s · 2^attempt · (1 + U[0, 1))``, capped at ``max_backoff_s`` and at the time
left); other HTTP errors are not retried. A request that still fails returns None and never
raises.

Fault kinds counted (cumulative, ``fault_counts()``): ``timeout``, ``connection``,
``http_5xx``, ``http_429``, ``http_4xx``, ``malformed_json`` (per failed attempt),
``retries`` (re-sent attempts) and ``failed_requests`` (requests that returned None).
Failure-rate warning: every ``warn_every`` batches, when more than ``warn_failure_rate`` of
that window's requests failed, a warning is logged with the numbers and each endpoint's
health (``endpoint_health()``).

``check_endpoints()`` (call it at start-up) GETs ``<base>/models`` on each endpoint and
raises ``JudgeEndpointError`` naming every unreachable URL.
"""

from __future__ import annotations

from advgame_jax.errors import UserError
import concurrent.futures
import http.client
import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Optional, Sequence

from advgame_jax.game.judge import FaultCounter


class JudgeEndpointError(UserError, RuntimeError):
    """A judge endpoint cannot be reached or is misconfigured."""


class _Malformed(Exception):
    pass


class _HTTPStatus(Exception):
    def __init__(self, code: int):
        super().__init__(f"HTTP {code}")
        self.code = code


class _Endpoint:
    """One replica: its address, requests in flight and health."""

    def __init__(self, base: str):
        self.base = base
        u = urllib.parse.urlsplit(base)
        self.https = u.scheme == "https"
        self.host, self.port = u.hostname, u.port or (443 if self.https else 80)
        self.path = u.path.rstrip("/")
        self.in_flight = self.peak_in_flight = self.assigned = 0
        self.consecutive_failures = 0
        self.unhealthy_until = 0.0
        self.requests = self.failures = 0


class EndpointBackend:
    """Concurrent, retrying client of one or more OpenAI-compatible chat endpoints.

    endpoints: base URLs such as ``http://host:8000/v1``; model: the served model name.
    api_key: sent as ``Authorization: Bearer`` when given (never logged).
    timeout_s: wall-clock limit per request, retries included; max_retries: re-sends after
    the first attempt. concurrency: requests in flight in total;
    max_in_flight_per_endpoint: per replica (0: no per-replica bound).
    unhealthy_after / unhealthy_cooldown_s: health rule (module docstring).
    warn_failure_rate / warn_every: failure-rate warning (module docstring).
    temperature / top_p / max_tokens: decoding of the judge (top_p 1.0 is not sent, so the
    server's default applies). seed: seeds the backoff jitter.
    sleep / clock: injectable for tests.
    """

    def __init__(self, endpoints: Sequence[str], model: str, *, api_key: Optional[str] = None,
                 timeout_s: float = 120.0, max_retries: int = 3, concurrency: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 8192,
                 backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, seed: int = 0,
                 max_in_flight_per_endpoint: int = 0, unhealthy_after: int = 3,
                 unhealthy_cooldown_s: float = 30.0, warn_failure_rate: float = 0.1,
                 warn_every: int = 10, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
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
        if not 0.0 < float(top_p) <= 1.0:
            raise JudgeEndpointError(f"judge top_p: expected a number in (0, 1], got {top_p!r}")
        self.top_p = float(top_p)
        self.max_tokens = int(max_tokens)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        if max_in_flight_per_endpoint < 0 or unhealthy_after < 1 or warn_every < 1 \
                or not 0.0 <= warn_failure_rate <= 1.0:
            raise JudgeEndpointError(
                "judge endpoint options: expected max_in_flight_per_endpoint >= 0, "
                "unhealthy_after >= 1, warn_every >= 1, 0 <= warn_failure_rate <= 1; got "
                f"{max_in_flight_per_endpoint}, {unhealthy_after}, {warn_every}, {warn_failure_rate}")
        self.max_in_flight_per_endpoint = int(max_in_flight_per_endpoint)
        self.unhealthy_after = int(unhealthy_after)
        self.unhealthy_cooldown_s = float(unhealthy_cooldown_s)
        self.warn_failure_rate = float(warn_failure_rate)
        self.warn_every = int(warn_every)
        self._sleep = sleep
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)
        self._faults = FaultCounter()
        self._replicas = [_Endpoint(e) for e in self.endpoints]
        self._window = [0, 0, 0]  # batches, requests, failed requests since the last check
        self.warnings_logged = 0

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

    # ------------------------------------------------------------------ replicas
    def _acquire(self) -> _Endpoint:
        """The least-loaded healthy replica with a free slot (waits for one)."""
        with self._slot_free:
            while True:
                now = self._clock()
                cap = self.max_in_flight_per_endpoint or None
                free = [r for r in self._replicas if cap is None or r.in_flight < cap]
                healthy = [r for r in free if r.unhealthy_until <= now]
                pool = healthy or free
                if pool:
                    best = min(pool, key=lambda r: (r.in_flight, r.assigned,
                                                    self._replicas.index(r)))
                    best.assigned += 1
                    best.in_flight += 1
                    best.peak_in_flight = max(best.peak_in_flight, best.in_flight)
                    return best
                self._slot_free.wait()

    def _release(self, replica: _Endpoint, ok: bool) -> None:
        with self._slot_free:
            replica.in_flight -= 1
            replica.requests += 1
            if ok:
                replica.consecutive_failures = 0
            else:
                replica.failures += 1
                replica.consecutive_failures += 1
                if replica.consecutive_failures >= self.unhealthy_after:
                    replica.unhealthy_until = self._clock() + self.unhealthy_cooldown_s
            self._slot_free.notify()

    def endpoint_health(self) -> list[dict]:
        """Per endpoint: base URL, healthy now, in flight (now / at most), attempts, failed
        attempts."""
        now = self._clock()
        with self._lock:
            return [{"endpoint": r.base, "healthy": r.unhealthy_until <= now,
                     "in_flight": r.in_flight, "peak_in_flight": r.peak_in_flight,
                     "attempts": r.requests, "failures": r.failures}
                    for r in self._replicas]

    # ------------------------------------------------------------------ one attempt
    def _attempt(self, replica: _Endpoint, prompt: str, deadline: float) -> str:
        left = deadline - self._clock()
        if left <= 0:
            raise TimeoutError("no time left")
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_p < 1.0:
            payload["top_p"] = self.top_p
        body = json.dumps(payload).encode()
        cls = http.client.HTTPSConnection if replica.https else http.client.HTTPConnection
        conn = cls(replica.host, replica.port, timeout=left)
        expired = threading.Event()

        def watchdog():  # unblocks a read that a trickling server keeps alive
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(left, watchdog)
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", f"{replica.path}/chat/completions", body=body,
                         headers=self._headers())
            resp = conn.getresponse()
            chunks = []
            while True:
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if expired.is_set():
                    break
            if expired.is_set():
                raise TimeoutError("wall-clock timeout")
            if resp.status >= 400:
                raise _HTTPStatus(resp.status)
            raw = b"".join(chunks)
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise TimeoutError("wall-clock timeout") from None
            raise
        finally:
            timer.cancel()
            conn.close()
        try:
            content = json.loads(raw.decode("utf-8"))["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise _Malformed(str(err)) from None
        if not isinstance(content, str):
            raise _Malformed("message content is not a string")
        return content

    def _request(self, prompt: str) -> Optional[str]:
        deadline = self._clock() + self.timeout_s
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._faults.add("retries")
            replica = self._acquire()
            ok = False
            try:
                result = self._attempt(replica, prompt, deadline)
                ok = True
                return result
            except _HTTPStatus as err:
                code = err.code
                kind = "http_5xx" if code >= 500 else "http_429" if code == 429 else "http_4xx"
                self._faults.add(kind)
                if kind == "http_4xx":
                    break
            except _Malformed:
                self._faults.add("malformed_json")
            except (TimeoutError, socket.timeout):
                self._faults.add("timeout")
            except Exception:  # refused, reset mid-body, DNS: a transport fault
                self._faults.add("connection")
            finally:
                self._release(replica, ok)
            left = deadline - self._clock()
            if attempt < self.max_retries and left > 0:
                self._sleep(min(self._backoff(attempt), left))
            if deadline - self._clock() <= 0:
                break
        self._faults.add("failed_requests")
        return None

    def complete(self, prompts: Sequence[str]) -> list[Optional[str]]:
        """One answer per prompt (None where every attempt failed), in order."""
        if not prompts:
            return []
        workers = min(self.concurrency, len(prompts))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            out = list(pool.map(self._request, prompts))
        self._note_failures(len(out), sum(o is None for o in out))
        return out

    def _note_failures(self, requests: int, failed: int) -> None:
        w = self._window
        w[0] += 1
        w[1] += requests
        w[2] += failed
        if w[0] < self.warn_every:
            return
        batches, total, bad = w
        self._window = [0, 0, 0]
        if total and bad / total > self.warn_failure_rate:
            self.warnings_logged += 1
            health = ", ".join(f"{h['endpoint']} {'up' if h['healthy'] else 'UNHEALTHY'} "
                               f"({h['failures']}/{h['attempts']} attempts failed)"
                               for h in self.endpoint_health())
            logging.getLogger("advgame_jax.judge").warning(
                "JUDGE FAILURE RATE %.1f%% over the last %d batches (%d of %d requests failed "
                "after retries; threshold %.1f%%); their slots become judge error values. "
                "Endpoints: %s. Faults so far: %s", 100.0 * bad / total, batches, bad, total,
                100.0 * self.warn_failure_rate, health, self._faults.snapshot())

    def fault_counts(self) -> dict[str, int]:
        return self._faults.snapshot()
