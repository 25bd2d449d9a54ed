"""OpenAI-compatible HTTP server over a ``Sampler``: a FastAPI app served by uvicorn.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` for
server-sent events), ``GET /v1/models``; fields and bodies in ``openai_schema``. Binds
127.0.0.1 by default. Optional API key (``Authorization: Bearer <key>``, checked before the
body is read). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 invalid body, 401 bad key, 404 unknown path or model, 405 wrong method, 413 body over
``max_body_bytes`` (from Content-Length alone when it is given), 503 queue full (with
``Retry-After``) or shutting down, 500 generation failed.

Load: a connection is a coroutine, not a thread; at most ``max_connections`` are open
(uvicorn's ``limit_concurrency``), and each request's headers + body must arrive within
``read_timeout_s`` (``http_guard``), so slow clients cannot starve the others. Validated
requests wait in a FIFO of at most ``queue_size``; beyond it the answer is 503 with
``Retry-After`` (and ``retry-after-ms``): the time until the queue has drained to this
client's turn, from the measured seconds per request, staggered so that rejected clients come
back at the rate the server serves. ONE worker thread takes every waiting request (up to
``max_batch_requests``) into one ``sampler.generate_many`` call, so concurrent requests share
batches. The sampler generates a completion in one compiled call, so a streamed response
starts once its completion is done and carries it as one chunk per choice
(``openai_schema``).
``shutdown()`` is graceful: new requests get 503, queued ones are served and answered, then
the socket closes.

``serve_model_dir`` serves an HF export (``servable.check_hf_export``) and refuses an attacker
checkpoint unless explicitly allowed (``servable.check_servable``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import logging
import math
import socket
import threading
import time
from typing import Optional, Protocol, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from advgame_jax.sampling import openai_schema as schema
from advgame_jax.sampling import servable
from advgame_jax.sampling.base import Completion, SamplingParams
from advgame_jax.sampling.http_guard import protocol_with_deadline
from advgame_jax.sampling.openai_schema import Limits, ParsedRequest, RequestError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Network, auth and load limits of one server (``limits``: per-request bounds)."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0 = an ephemeral port (tests)
    api_key: Optional[str] = None
    model_name: str = "advgame"
    max_body_bytes: int = 1 << 20
    queue_size: int = 64  # requests waiting for the worker; beyond it 503 + Retry-After
    max_batch_requests: int = 16
    request_timeout_s: float = 600.0
    read_timeout_s: float = 30.0  # a request's headers + body must arrive within this
    max_connections: int = 1024
    listen_backlog: int = 2048
    keep_alive_s: float = 5.0
    limits: Limits = Limits()


class BatchSampler(Protocol):
    """What the server needs from its sampler: several requests served in shared batches
    (``JaxSampler.generate_many``: one list of completions per request, each what
    ``generate`` would return for it alone)."""

    def generate_many(
        self, requests: Sequence[tuple[Sequence[Sequence[int]], SamplingParams]]
    ) -> list[list[Completion]]: ...


class OpenAIServer:
    """The server: ``start()`` (background threads), ``url``, ``shutdown()``; a context manager.

    ``sampler``: a ``BatchSampler`` (the JAX sampler; top_logprobs need its weights);
    ``tokenizer``: a ``ChatTokenizer`` (renders chat messages and text prompts)."""

    def __init__(self, sampler: BatchSampler, tokenizer, config: ServerConfig = ServerConfig()):
        self.sampler, self.tokenizer, self.config = sampler, tokenizer, config
        family = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)[0][0]
        self._sock = socket.create_server(
            (config.host, config.port), family=family, backlog=config.listen_backlog
        )
        self._waiting: collections.deque = collections.deque()  # (request, future)
        self._cv = threading.Condition()
        self._closing = self._stop = False
        self._running, self._per_request_s, self._next_slot = 0, 0.05, 0.0
        self._batch_start, self._last_batch = 0.0, (1, 0.0)  # (requests, seconds)
        self._threads = [threading.Thread(target=self._work, daemon=True)]
        self.rejected = 0  # requests answered 503 because the queue was full
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(
                _build_app(self),
                http=protocol_with_deadline(config.read_timeout_s),
                ws="none",
                lifespan="off",
                log_level="warning",
                access_log=False,
                # uvicorn annotates these two as int; it hands them to asyncio timers, which take
                # float seconds.
                timeout_keep_alive=config.keep_alive_s,  # pyright: ignore[reportArgumentType]
                limit_concurrency=config.max_connections,
                backlog=config.listen_backlog,
                timeout_graceful_shutdown=config.request_timeout_s,  # pyright: ignore[reportArgumentType]
            )
        )
        self._threads.append(
            threading.Thread(target=lambda: self._uvicorn.run(sockets=[self._sock]), daemon=True)
        )

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> "OpenAIServer":
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + 60
        while not self._uvicorn.started and self._threads[1].is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start within 60 s")
            time.sleep(0.01)
        return self

    def shutdown(self, timeout: float = 60.0) -> None:
        """Refuse new work, finish the queued jobs (their responses are sent), close."""
        if self._closing:
            return
        self._closing = self._uvicorn.should_exit = True  # uvicorn waits for requests in flight
        if self._threads[1].is_alive():
            self._threads[1].join(timeout)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._threads[0].is_alive():
            self._threads[0].join(timeout)
        self._sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    # ------------------------------------------------------------------ requests
    def authorize(self, request: Request) -> None:
        given, key = request.headers.get("authorization", ""), self.config.api_key
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise RequestError(
                401,
                "invalid or missing API key (Authorization: Bearer ...)",
                code="invalid_api_key",
            )

    async def _read_body(self, request: Request) -> bytes:
        """The body; 413 past ``max_body_bytes`` (read on up to 16x the limit, so the client
        sees the 413, not a reset); ClientDisconnect when the client went away."""
        limit, body, declared = self.config.max_body_bytes, bytearray(), request.headers
        declared = declared.get("content-length", "")
        too_big = RequestError(
            413,
            f"request body of {declared or 'more than ' + str(limit)}"
            f" bytes exceeds the limit of {limit} bytes",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        if declared.isdigit() and int(declared) > 16 * limit:
            raise too_big
        async for chunk in request.stream():
            body += chunk if len(body) <= limit else b""
            if len(body) > limit and not declared.isdigit():
                raise too_big
        if len(body) > limit:
            raise too_big
        return bytes(body)

    async def complete(self, request: Request, kind: str):
        self.authorize(request)
        try:
            raw = await self._read_body(request)
        except ClientDisconnect:  # e.g. closed by the read deadline
            return JSONResponse({}, status_code=400)
        req = schema.parse(kind, raw, self.tokenizer, self.config.limits, self.config.model_name)
        from advgame_jax.sampling.jax_sampler import JaxSampler

        if req.top_logprobs and not isinstance(self.sampler, JaxSampler):  # a forward pass
            raise RequestError(
                400, "this server's sampler returns no top_logprobs", param="top_logprobs"
            )
        if self._closing:
            raise RequestError(503, "the server is shutting down", type="server_error")
        future = concurrent.futures.Future()
        with self._cv:
            if len(self._waiting) >= self.config.queue_size:
                raise self._overloaded()
            self._waiting.append((req, future))
            self._cv.notify()
        try:
            completions, tops = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), self.config.request_timeout_s
            )
        except asyncio.TimeoutError:
            raise RequestError(503, "generation timed out", type="server_error") from None
        out = schema.responses(req, completions, self.tokenizer, self.config.model_name, tops)
        if not req.stream:
            return JSONResponse(out)
        return StreamingResponse(out, media_type="text/event-stream")

    def _overloaded(self) -> RequestError:
        """503 with this client's turn: the queue's drain time, one slot per rejection."""
        self.rejected += 1
        now = time.monotonic()
        per = self._per_request_s  # a batch running longer than that (compiling) says more
        if self._running:
            per = max(per, (now - self._batch_start) / self._running)
        drain = (len(self._waiting) + self._running) * per
        self._next_slot = max(self._next_slot, now + drain) + per
        wait = self._next_slot - now
        return RequestError(
            503,
            f"the request queue is full ({self.config.queue_size} waiting); retry in {wait:.1f} s",
            type="server_error",
            code="server_overloaded",
            headers={
                "Retry-After": str(max(1, math.ceil(wait))),
                "retry-after-ms": str(max(1, int(wait * 1000))),
            },
        )

    # ------------------------------------------------------------------ worker
    def _work(self):
        while True:
            with self._cv:
                while not self._waiting and not self._stop:
                    self._cv.wait()
                if not self._waiting:
                    return
                # The last batch's clients tend to come back together: wait a moment for them
                # (a lone client never waits).
                until = time.monotonic() + min(0.02, 0.1 * self._last_batch[1])
                want = min(self._last_batch[0], self.config.max_batch_requests)
                while len(self._waiting) < want and not self._stop and time.monotonic() < until:
                    self._cv.wait(max(0.0, until - time.monotonic()))
                take = min(len(self._waiting), self.config.max_batch_requests)
                batch = [self._waiting.popleft() for _ in range(take)]
                self._running, start = len(batch), time.monotonic()
                self._batch_start = start
            self._run(batch)
            with self._cv:
                self._running, self._last_batch = 0, (len(batch), time.monotonic() - start)
                per = self._last_batch[1] / len(batch)
                self._per_request_s = 0.7 * self._per_request_s + 0.3 * per

    def _run(self, batch: list):
        try:
            results = self.sampler.generate_many([(r.prompts, r.params) for r, _ in batch])
            done = [self._finish(r, out) for (r, _), out in zip(batch, results, strict=True)]
        except Exception as err:  # noqa: BLE001 - isolate the failing request, not the batch
            if len(batch) > 1:
                for job in batch:
                    self._run([job])
                return
            log.exception("generation failed")
            batch[0][1].set_exception(
                RequestError(500, f"generation failed: {type(err).__name__}", type="server_error")
            )
            return
        for (_, future), result in zip(batch, done, strict=True):
            future.set_result(result)

    def _finish(self, req: ParsedRequest, completions):
        """Stop strings applied; the top-k alternatives when asked for (worker thread)."""
        completions = [schema.apply_stop(c, req.stop_strings, self.tokenizer) for c in completions]
        if not req.top_logprobs:
            return completions, None
        from advgame_jax.sampling.top_logprobs import top_logprobs

        rows = [(req.prompts[i // req.params.n], c.token_ids) for i, c in enumerate(completions)]
        return completions, top_logprobs(self.sampler, rows, req.top_logprobs)


def _build_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError):
        return JSONResponse(err.body, status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        code = "method_not_allowed" if err.status_code == 405 else "not_found"
        message = f"{request.method} {request.url.path}: {err.detail}"
        return await _request_error(request, RequestError(err.status_code, message, code=code))

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        card = {"id": server.config.model_name, "object": "model", "created": 0}
        return {"object": "list", "data": [{**card, "owned_by": "advgame_jax"}]}

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def complete(request: Request):
        chat = request.url.path.endswith("/chat/completions")
        return await server.complete(request, "chat" if chat else "completions")

    return app


def serve_model_dir(
    model_dir: str,
    *,
    config: ServerConfig = ServerConfig(),
    allow_attacker: bool = False,
    mesh=None,
    compute_dtype=None,
    max_batch_size: int = 64,
) -> OpenAIServer:
    """Build (not start) a server over an HF export with the JAX sampler.

    Raises ``NotAnHFExportError`` for anything but an HF export with its tokenizer and
    ``AttackerCheckpointError`` for an attacker checkpoint without ``allow_attacker``.
    """
    servable.check_hf_export(model_dir)
    servable.check_servable(model_dir, allow_attacker=allow_attacker)  # the attacker gate
    from advgame_jax.sampling.jax_sampler import JaxSampler
    from advgame_jax.tokenization import ChatTokenizer

    tokenizer = ChatTokenizer.from_dir(model_dir)
    sampler = JaxSampler.from_hf_dir(
        model_dir,
        tokenizer=tokenizer,
        mesh=mesh,
        compute_dtype=compute_dtype,
        max_batch_size=max_batch_size,
        min_batch_bucket=min(8, max_batch_size),
        min_prompt_bucket=64,
        max_prompt_len=max(config.limits.max_prompt_tokens, 16),
    )
    return OpenAIServer(sampler, tokenizer, config)
