"""The one HTTP client of the project's OpenAI-compatible servers (judge endpoints, evaluation
classifiers and targets, vLLM engine servers): JSON requests over httpx with pooled
keep-alive connections, routed to the least-loaded healthy replica, and the failure-rate
warning a caller raises over its batches of requests.

Deadline. ``timeout_s`` is wall-clock per request, retries and backoff included. Each attempt
runs on httpx's asyncio client (one event-loop thread for the process) under
``asyncio.wait_for`` with the time left, so a server trickling its headers or body one byte a
second still fails at the deadline (``DeadlineExceeded``): httpx's own timeouts are per read.

Retries. Connection faults (refused, reset, closed mid-answer), HTTP 408/429/5xx and
malformed bodies are retried up to ``max_retries`` times while time is left. The wait before a
retry is the server's ``Retry-After`` (seconds or an HTTP date) when it sends one (if that is
past the deadline the request fails at once), else ``backoff_s · 2^attempt · (1 + U[0, 1))``
with seeded jitter, capped at ``max_backoff_s``; always capped at the time left. Other HTTP
errors are not retried. After the last attempt the last fault is raised.

Faults. Every exception derives from ``ClientError`` and has a ``kind`` used as a fault-count
key: ``connection`` (``Unreachable``), ``timeout`` (``DeadlineExceeded``), ``http_5xx`` /
``http_429`` / ``http_4xx`` (``HTTPStatusError``: code, body excerpt, Retry-After),
``malformed_json`` (``MalformedResponse``: not JSON, over ``max_body_bytes``, or ``parse``
rejected it). ``fault_counts()`` holds one count per failed attempt by kind, plus ``retries``
(re-sent attempts) and ``failed_requests``. Proxies from the environment are not used.

Replicas (``ReplicaRouter``): each attempt goes to the healthy replica with the fewest
requests in flight (ties: the one given the fewest requests so far, then the first listed), at
most ``max_in_flight_per_endpoint`` on any one replica (0: no bound; ``acquire`` waits for a
free slot). ``unhealthy_after`` consecutive failed attempts mark a replica unhealthy for
``unhealthy_cooldown_s``; it is then used only when no replica is healthy.

Failure-rate warning (``FailureRateMonitor``): ``note(requests, failed)`` once per batch. A
warning is logged at the end of the first batch at which the failure rate of the batches since
the last warning crosses ``threshold`` (so a judge that fails from the start is named after its
first batch); while the rate stays above it, at most one more warning every ``every`` batches.
A window of ``every`` batches under the threshold starts a new window.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import email.utils
import json
import logging
import os
import random
import threading
import time
from typing import Any, Callable, Optional, Sequence

import httpx

DEFAULT_TIMEOUT_S = 300.0


class ClientError(Exception):
    """A request that got no usable answer; ``kind`` names the fault, ``url`` the target."""

    kind, retryable, retry_after = "connection", True, None

    def __init__(self, message: str, url: str = ""):
        super().__init__(f"{url}: {message}" if url else message)
        self.url = url


class Unreachable(ClientError, ConnectionError):
    """No usable connection: refused, reset, closed mid-answer, name not resolved."""


class DeadlineExceeded(ClientError, TimeoutError):
    """No complete answer before the request's wall-clock deadline."""

    kind = "timeout"


class MalformedResponse(ClientError, ValueError):
    """A 2xx answer that is not JSON, too large, or not of the expected shape."""

    kind = "malformed_json"


class HTTPStatusError(ClientError):
    """The server answered with HTTP ``code`` >= 400 (``body_excerpt``: its first 200
    characters; ``retry_after``: seconds, from its ``Retry-After``)."""

    def __init__(self, code: int, raw: bytes, url: str, retry_after: Optional[str]):
        self.body_excerpt = raw[:800].decode("utf-8", "replace")[:200]
        super().__init__(f"HTTP {code}: {self.body_excerpt!r}", url)
        self.code, self.retry_after = code, _seconds_until(retry_after)
        self.kind = "http_5xx" if code >= 500 else "http_429" if code == 429 else "http_4xx"
        self.retryable = code >= 500 or code in (408, 429)


def _seconds_until(value: Optional[str]) -> Optional[float]:
    """A ``Retry-After`` value (seconds or an HTTP date) in seconds from now."""
    try:
        return max(0.0, float(value or ""))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value or "").timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class FaultCounter:
    """Thread-safe cumulative counts of fault kinds."""

    def __init__(self):
        self._lock, self._counts = threading.Lock(), collections.Counter()

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._counts[kind] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


_loop: Optional[tuple[int, asyncio.AbstractEventLoop]] = None  # (pid, the loop its thread runs)
_loop_lock = threading.Lock()


def _run(coro):
    """Run ``coro`` on the process's HTTP event-loop thread and wait for its result."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop[0] != os.getpid():  # first use, or a forked child
            _loop = (os.getpid(), asyncio.new_event_loop())
            threading.Thread(target=_loop[1].run_forever, daemon=True, name="advgame-http").start()
    return asyncio.run_coroutine_threadsafe(coro, _loop[1]).result()


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """How a :class:`Client` sends its requests.

    api_key: sent as ``Authorization: Bearer`` (never logged or shown in ``repr``).
    timeout_s / max_retries / backoff_s / max_backoff_s / seed: module docstring.
    max_connections: pooled keep-alive connections (all replicas together).
    max_in_flight_per_endpoint / unhealthy_after / unhealthy_cooldown_s: ``ReplicaRouter``.
    max_body_bytes: the largest answer read. field: the setting that named the endpoints.
    sleep: the wait between attempts (injectable for tests; the deadline is real time).
    """

    api_key: Optional[str] = dataclasses.field(default=None, repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    seed: int = 0
    max_connections: int = 64
    max_in_flight_per_endpoint: int = 0
    unhealthy_after: int = 3
    unhealthy_cooldown_s: float = 30.0
    max_body_bytes: int = 64 << 20
    field: str = "endpoint"
    sleep: Callable[[float], None] = time.sleep


class Client:
    """JSON requests to one service served by one or more replicas (base URLs), sent as
    ``options`` says; ``fields``: :class:`ClientOptions` fields by keyword, replacing those of
    ``options`` (``Client(urls, timeout_s=5)``)."""

    def __init__(
        self, endpoints: Sequence[str], options: Optional[ClientOptions] = None, **fields: Any
    ):
        o = self.options = dataclasses.replace(options or ClientOptions(), **fields)
        urls = self.endpoints = tuple(str(e or "").strip().rstrip("/") for e in endpoints)
        if not urls or not all(u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(
                f"{o.field}: expected an http(s):// base URL (at least one) such as "
                f"http://127.0.0.1:8000/v1, got {list(endpoints)!r}"
            )
        if not o.timeout_s > 0 or o.max_retries < 0 or o.backoff_s < 0 or o.max_connections < 1:
            raise ValueError(
                f"{o.field}: expected timeout_s > 0, max_retries >= 0, backoff_s >= 0, "
                f"max_connections >= 1; got {o.timeout_s}, {o.max_retries}, "
                f"{o.backoff_s}, {o.max_connections}"
            )
        self.router = ReplicaRouter(
            self.endpoints, o.max_in_flight_per_endpoint, o.unhealthy_after, o.unhealthy_cooldown_s
        )
        self.faults = FaultCounter()
        self._rng, self._rng_lock, n = random.Random(o.seed), threading.Lock(), o.max_connections
        self._http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {o.api_key}"} if o.api_key else {},
            trust_env=False,
            timeout=None,
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        )

    def __repr__(self) -> str:
        return f"Client(endpoints={self.endpoints}, timeout_s={self.options.timeout_s:g})"

    def close(self) -> None:
        _run(self._http.aclose())

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fault_counts(self) -> dict[str, int]:
        return self.faults.snapshot()

    def endpoint_health(self) -> list[dict]:
        return self.router.health()

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, payload: Any, **kw) -> Any:
        return self.request("POST", path, payload, **kw)

    def request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        parse: Optional[Callable[[Any], Any]] = None,
        timeout_s: Optional[float] = None,
        max_retries: Optional[int] = None,
        replica: Optional[int] = None,
        count: bool = True,
    ) -> Any:
        """``method`` ``<base><path>`` with ``payload`` as a JSON body; the decoded JSON answer
        (None for an empty body), or ``parse(answer)`` (a KeyError/IndexError/TypeError/
        ValueError there is a ``MalformedResponse``). Raises the last ``ClientError`` once
        retries or time run out. replica: send every attempt to that replica (index into
        ``endpoints``). count: False leaves fault counts and replica health untouched."""
        o, budget = self.options, self.options.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        retries = o.max_retries if max_retries is None else max_retries
        note = self.faults.add if count else (lambda kind: None)
        err = ClientError("no attempt")
        for attempt in range(retries + 1):
            if attempt:
                note("retries")
            rep = self.router.acquire(replica, timeout=deadline - time.monotonic())
            try:
                if rep is None:  # every replica's slots stayed taken until the deadline
                    raise DeadlineExceeded("no free replica slot before the request's deadline")
                value = self._attempt(method, rep.base + path, payload, parse, deadline, budget)
                self.router.release(rep, True, record=count)
                return value
            except ClientError as e:
                err = e
                note(e.kind)
                if rep is not None:
                    self.router.release(rep, False, record=count)
            wait, left = err.retry_after, deadline - time.monotonic()
            if rep is None or not err.retryable or attempt >= retries or left <= 0:
                break
            if wait is not None and wait >= left:  # a wait past the deadline
                break
            if wait is None:
                with self._rng_lock:
                    wait = min(o.max_backoff_s, o.backoff_s * 2**attempt * (1 + self._rng.random()))
            o.sleep(min(wait, left))
            if deadline - time.monotonic() <= 0:
                break
        note("failed_requests")
        raise err

    async def _fetch(self, method: str, url: str, payload: Any):
        async with self._http.stream(method, url, json=payload) as resp:
            raw = b""
            async for chunk in resp.aiter_bytes():
                raw += chunk
                if len(raw) > self.options.max_body_bytes:
                    limit = self.options.max_body_bytes
                    raise MalformedResponse(f"answer larger than {limit} bytes", url)
            return resp, raw

    def _attempt(self, method: str, url: str, payload: Any, parse, deadline: float, budget):
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            resp, raw = _run(asyncio.wait_for(self._fetch(method, url, payload), left))
        except (TimeoutError, httpx.TimeoutException):
            raise DeadlineExceeded(
                f"no complete answer within the {budget:g} s deadline", url
            ) from None
        except httpx.HTTPError as e:  # refused, reset, closed mid-answer, protocol error
            raise Unreachable(f"{type(e).__name__}: {e}", url) from None
        if resp.status_code >= 400:
            raise HTTPStatusError(resp.status_code, raw, url, resp.headers.get("retry-after"))
        try:
            obj = json.loads(raw) if raw.strip() else None  # an empty answer: None
        except ValueError as e:
            raise MalformedResponse(
                f"answer is not JSON ({e}); first bytes {raw[:80]!r}", url
            ) from None
        try:
            return obj if parse is None else parse(obj)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise MalformedResponse(
                f"unexpected answer shape ({type(e).__name__}: {e})", url
            ) from None


def served_models(answer: Any) -> list[str]:
    """The model ids of a ``GET /models`` answer (``{"data": [{"id": ...}, ...]}``)."""
    ids = [m["id"] for m in answer["data"]]
    if not all(isinstance(i, str) for i in ids):
        raise ValueError("model ids are not strings")
    return ids


def chat_text(answer: Any) -> str:
    """The first choice's message content of a chat completion."""
    text = answer["choices"][0]["message"]["content"]
    if not isinstance(text, str):
        raise ValueError("message content is not a string")
    return text


def check_models(client: Client, model: str, timeout_s: float):
    """``GET /models`` on each replica (uncounted): (every served name, ``"<url> (<why>)"`` for
    each replica that did not answer, ``"<base> serves [...]"`` for each not serving ``model``)."""
    names, bad, wrong = [], [], []
    for i, base in enumerate(client.endpoints):
        try:
            probe = dict(replica=i, timeout_s=timeout_s, max_retries=1, count=False)
            ids = client.get("/models", parse=served_models, **probe)
        except ClientError as err:
            bad.append(f"{base}/models ({type(err).__name__}: {err})")
            continue
        names.extend(n for n in ids if n not in names)
        if model and ids and model not in ids:
            wrong.append(f"{base} serves {ids}")
    return names, bad, wrong


def run_batch(fn: Callable, items: Sequence, concurrency: int, monitor) -> list:
    """``fn(item)`` for every item, at most ``concurrency`` at once, in order; a ``ClientError``
    gives None. The batch's failures go to ``monitor.note`` (a ``FailureRateMonitor``)."""

    def one(item):
        try:
            return fn(item)
        except ClientError:
            return None

    if not items:
        return []
    with concurrent.futures.ThreadPoolExecutor(min(concurrency, len(items))) as pool:
        out = list(pool.map(one, items))
    monitor.note(len(out), sum(o is None for o in out))
    return out


@dataclasses.dataclass(eq=False)
class Replica:
    """One replica: its base URL, requests in flight and health."""

    base: str
    in_flight: int = 0
    peak_in_flight: int = 0
    assigned: int = 0
    consecutive_failures: int = 0
    unhealthy_until: float = 0.0
    attempts: int = 0
    failures: int = 0


class ReplicaRouter:
    """The least-loaded healthy replica of ``bases`` for each attempt (module docstring)."""

    def __init__(
        self, bases, max_in_flight_per_endpoint=0, unhealthy_after=3, unhealthy_cooldown_s=30.0
    ):
        if max_in_flight_per_endpoint < 0 or unhealthy_after < 1 or unhealthy_cooldown_s < 0:
            raise ValueError(
                "replica options: expected max_in_flight_per_endpoint >= 0, "
                f"unhealthy_after >= 1, unhealthy_cooldown_s >= 0; got "
                f"{max_in_flight_per_endpoint}, {unhealthy_after}, {unhealthy_cooldown_s}"
            )
        self.replicas = [Replica(b) for b in bases]
        self.cap, self.unhealthy_after = max_in_flight_per_endpoint, unhealthy_after
        self.cooldown_s, self._cond = unhealthy_cooldown_s, threading.Condition()

    def acquire(self, pin: Optional[int] = None, timeout: float = 1e9) -> Optional[Replica]:
        """The least-loaded healthy replica with a free slot (``pin``: that replica, whatever
        its health); waits for a slot, at most ``timeout`` seconds (then None)."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                cands = self.replicas if pin is None else [self.replicas[pin]]
                free = [r for r in cands if not self.cap or r.in_flight < self.cap]
                now = time.monotonic()
                pool = [r for r in free if r.unhealthy_until <= now] or free
                if pool:
                    best = min(pool, key=lambda r: (r.in_flight, r.assigned))  # then: listed first
                    best.assigned, best.in_flight = best.assigned + 1, best.in_flight + 1
                    best.peak_in_flight = max(best.peak_in_flight, best.in_flight)
                    return best
                if end - now <= 0:
                    return None
                self._cond.wait(end - now)

    def release(self, replica: Replica, ok: bool, record: bool = True) -> None:
        """Free ``replica``'s slot; ``record``: count the attempt in its health."""
        with self._cond:
            replica.in_flight -= 1
            self._cond.notify()
            if record:
                replica.attempts += 1
                replica.failures += not ok
                replica.consecutive_failures = 0 if ok else replica.consecutive_failures + 1
                if replica.consecutive_failures >= self.unhealthy_after:
                    replica.unhealthy_until = time.monotonic() + self.cooldown_s

    def health(self) -> list[dict]:
        """Per replica: base URL, healthy now, in flight (now / at most), attempts, failed
        attempts."""
        now, keys = time.monotonic(), ("in_flight", "peak_in_flight", "attempts", "failures")
        with self._cond:
            return [
                {"endpoint": r.base, "healthy": r.unhealthy_until <= now}
                | {k: getattr(r, k) for k in keys}
                for r in self.replicas
            ]

    def describe(self) -> str:
        return ", ".join(
            f"{h['endpoint']} {'up' if h['healthy'] else 'UNHEALTHY'} "
            f"({h['failures']}/{h['attempts']} attempts failed)"
            for h in self.health()
        )


@dataclasses.dataclass(eq=False, kw_only=True)
class FailureRateMonitor:
    """Warns when too many of a caller's requests fail (module docstring).

    what: who fails, e.g. "JUDGE"; consequence: what the failures become;
    details: extra text at the end of the warning (endpoint health, fault counts)."""

    threshold: float = 0.1
    every: int = 10
    what: str = "JUDGE"
    consequence: str = "their slots become judge error values"
    details: Callable[[], str] = lambda: ""
    logger: str = "advgame_jax.judge"
    warnings_logged: int = 0

    def __post_init__(self):
        if self.every < 1 or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"failure-rate warning: expected every >= 1 and 0 <= threshold <= 1; "
                f"got {self.every}, {self.threshold}"
            )
        self._lock, self._window = threading.Lock(), [0, 0, 0]  # batches, requests, failed
        self._since_warning: Optional[int] = None  # batches since the last warning

    def note(self, requests: int, failed: int) -> bool:
        """Record one batch; True when this batch logged a warning."""
        with self._lock:
            w = self._window
            batches, total, bad = self._window = [w[0] + 1, w[1] + requests, w[2] + failed]
            if self._since_warning is not None:
                self._since_warning += 1
            crossed = total > 0 and bad / total > self.threshold
            if not crossed or (self._since_warning or self.every) < self.every:
                if batches >= self.every and not crossed:
                    self._window = [0, 0, 0]
                return False
            self._window, self._since_warning = [0, 0, 0], 0
            self.warnings_logged += 1
        extra, es = self.details(), "" if batches == 1 else "es"
        logging.getLogger(self.logger).warning(
            f"{self.what} FAILURE RATE {100.0 * bad / total:.1f}% over the last {batches} "
            f"batch{es} ({bad} of {total} requests failed after retries; threshold "
            f"{100.0 * self.threshold:.1f}%); {self.consequence}.{f' {extra}' if extra else ''}"
        )
        return True
