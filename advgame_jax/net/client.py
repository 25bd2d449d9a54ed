"""The one HTTP client of the project's OpenAI-compatible servers (judge endpoints, evaluation
classifiers and targets, vLLM engine servers): JSON requests over httpx with pooled
keep-alive connections, routed to the least-loaded healthy replica (``net.replicas``).

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
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import email.utils
import json
import os
import random
import threading
import time
from typing import Any, Callable, Optional, Sequence

import httpx

from advgame_jax.net.replicas import ReplicaRouter

DEFAULT_TIMEOUT_S = 300.0
BODY_EXCERPT_CHARS = 200


class ClientError(Exception):
    """A request that got no usable answer; ``kind`` names the fault, ``url`` the target."""

    kind = "connection"

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
    """The server answered with HTTP ``code`` >= 400."""

    def __init__(
        self, code: int, body_excerpt: str, url: str = "", retry_after: Optional[float] = None
    ):
        super().__init__(f"HTTP {code}: {body_excerpt!r}", url)
        self.code, self.body_excerpt, self.retry_after = code, body_excerpt, retry_after
        self.kind = "http_5xx" if code >= 500 else "http_429" if code == 429 else "http_4xx"
        self.retryable = code >= 500 or code in (408, 429)


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


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def check_base_url(url: str, field: str) -> str:
    """``url`` without a trailing slash; ValueError naming ``field`` unless it is http(s)."""
    url = str(url or "").strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(
            f"{field}: expected an http(s):// base URL such as "
            f"http://127.0.0.1:8000/v1, got {url!r}"
        )
    return url


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """How a :class:`Client` sends its requests.

    api_key: sent as ``Authorization: Bearer`` (never logged or shown in ``repr``).
    timeout_s / max_retries / backoff_s / max_backoff_s / seed: module docstring.
    max_connections: pooled keep-alive connections (all replicas together).
    max_in_flight_per_endpoint / unhealthy_after / unhealthy_cooldown_s: ``ReplicaRouter``.
    max_body_bytes: the largest answer read. field: the setting that named the endpoints.
    sleep / clock: injectable for tests (``clock`` drives replica health only; the deadline is
    always real time).
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
    clock: Callable[[], float] = time.monotonic


class Client:
    """JSON requests to one service served by one or more replicas (base URLs), sent as
    ``options`` says; ``fields``: :class:`ClientOptions` fields by keyword, replacing those of
    ``options`` (``Client(urls, timeout_s=5)``)."""

    def __init__(
        self, endpoints: Sequence[str], options: Optional[ClientOptions] = None, **fields: Any
    ):
        o = self.options = dataclasses.replace(options or ClientOptions(), **fields)
        field = o.field
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        self.endpoints = tuple(check_base_url(e, field) for e in endpoints)
        if not self.endpoints:
            raise ValueError(f"{field}: expected at least one base URL such as http://host:8000/v1")
        if not o.timeout_s > 0 or o.max_retries < 0 or o.backoff_s < 0 or o.max_connections < 1:
            raise ValueError(
                f"{field}: expected timeout_s > 0, max_retries >= 0, backoff_s >= 0, "
                f"max_connections >= 1; got {o.timeout_s}, {o.max_retries}, "
                f"{o.backoff_s}, {o.max_connections}"
            )
        self.timeout_s, self.max_retries = float(o.timeout_s), int(o.max_retries)
        self.backoff_s, self.max_backoff_s = float(o.backoff_s), float(o.max_backoff_s)
        self.max_body_bytes, self.field = int(o.max_body_bytes), field
        self.router = ReplicaRouter(
            self.endpoints,
            max_in_flight_per_endpoint=o.max_in_flight_per_endpoint,
            unhealthy_after=o.unhealthy_after,
            unhealthy_cooldown_s=o.unhealthy_cooldown_s,
            clock=o.clock,
        )
        self.faults = FaultCounter()
        self._sleep, self._rng, self._rng_lock = o.sleep, random.Random(o.seed), threading.Lock()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if o.api_key:
            headers["Authorization"] = f"Bearer {o.api_key}"
        self._http = httpx.AsyncClient(
            headers=headers,
            trust_env=False,
            timeout=None,
            limits=httpx.Limits(
                max_connections=o.max_connections,
                max_keepalive_connections=o.max_connections,
                keepalive_expiry=30.0,
            ),
        )

    def __repr__(self) -> str:
        return f"Client(endpoints={self.endpoints}, timeout_s={self.timeout_s:g})"

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
        """``method`` ``<base><path>`` with ``payload`` as a JSON body; the decoded JSON answer,
        or ``parse(answer)`` (a KeyError/IndexError/TypeError/ValueError there is a
        ``MalformedResponse``). Raises the last ``ClientError`` once retries or time run out.
        replica: send every attempt to that replica (index into ``endpoints``).
        count: False leaves fault counts and replica health untouched (probes). An empty
        answer body decodes to None."""
        budget = self.timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + budget
        retries = self.max_retries if max_retries is None else int(max_retries)
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        note = self.faults.add if count else (lambda kind: None)
        err: Optional[ClientError] = None
        for attempt in range(retries + 1):
            if attempt:
                note("retries")
            rep = self.router.acquire(replica, timeout=deadline - time.monotonic())
            if rep is None:  # every replica's slots stayed taken until the deadline
                err = DeadlineExceeded("no free replica slot before the request's deadline")
                note(err.kind)
                break
            try:
                value = self._attempt(method, rep.base + path, body, parse, deadline, budget)
                self.router.release(rep, True, record=count)
                return value
            except ClientError as e:
                err = e
                note(e.kind)
                self.router.release(rep, False, record=count)
            wait, left = getattr(err, "retry_after", None), deadline - time.monotonic()
            if (
                not getattr(err, "retryable", True)
                or attempt >= retries
                or left <= 0
                or (wait is not None and wait >= left)
            ):  # a wait past the deadline
                break
            if wait is None:
                with self._rng_lock:
                    wait = self.backoff_s * (2**attempt) * (1 + self._rng.random())
                wait = min(self.max_backoff_s, wait)
            self._sleep(min(wait, left))
            if deadline - time.monotonic() <= 0:
                break
        note("failed_requests")
        assert err is not None  # retries >= 0: the loop ran and every attempt failed
        raise err

    async def _fetch(self, method: str, url: str, body: Optional[bytes]):
        async with self._http.stream(method, url, content=body) as resp:
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise MalformedResponse(f"answer larger than {self.max_body_bytes} bytes", url)
                chunks.append(chunk)
            return resp, b"".join(chunks)

    def _attempt(
        self, method: str, url: str, body: Optional[bytes], parse, deadline: float, budget: float
    ):
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            resp, raw = _run(asyncio.wait_for(self._fetch(method, url, body), left))
        except (TimeoutError, httpx.TimeoutException):
            raise DeadlineExceeded(
                f"no complete answer within the {budget:g} s deadline", url
            ) from None
        except httpx.HTTPError as e:  # refused, reset, closed mid-answer, protocol error
            raise Unreachable(f"{type(e).__name__}: {e}", url) from None
        if resp.status_code >= 400:
            raise HTTPStatusError(
                resp.status_code,
                raw[: 4 * BODY_EXCERPT_CHARS].decode("utf-8", "replace")[:BODY_EXCERPT_CHARS],
                url,
                _retry_after(resp.headers.get("retry-after")),
            )
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
            ids = client.get(
                "/models",
                parse=served_models,
                replica=i,
                timeout_s=timeout_s,
                max_retries=1,
                count=False,
            )
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
