"""OpenAI-compatible HTTP server over a ``Sampler`` (stdlib ``ThreadingHTTPServer`` only).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``
(request fields in ``openai_protocol``). Binds 127.0.0.1 by default. Optional API key
(``Authorization: Bearer <key>``, checked before the body is read). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 malformed JSON / missing or
ill-typed fields / out-of-range values / too many prompt tokens, 401 bad key, 404 unknown
path or model, 405 wrong method, 411 no Content-Length, 413 body over ``max_body_bytes``
(rejected from the header, the body is never read), 503 queue full, too many connections
or shutting down. Any body the parser cannot handle (deep nesting, huge numbers, wrong
types) is a 400, never a dropped connection; only generation failures are 500.

Load bounds: at most ``max_connections`` handler threads serve connections, and up to
``max_overflow`` more only read the request and answer 503 (so a client is told to retry
instead of seeing a reset); the listen backlog is ``listen_backlog``. One request asks for
at most ``limits.max_n`` completions (prompts × n).

Concurrency: handler threads parse and validate, then put a job on a bounded queue; ONE
worker thread takes every job waiting (up to ``max_batch_requests``) and serves them with one
``sampler.generate_many`` call (or ``generate`` per job for samplers without it), so
concurrent requests share batches. ``shutdown()`` is graceful: new requests get 503, queued
jobs finish and their responses are sent, then the socket closes.

Attacker checkpoints (see ``check_servable``) are refused unless explicitly allowed.
"""

from __future__ import annotations

from advgame_jax.errors import UserError
import dataclasses
import hmac
import json
import logging
import queue
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Optional

from advgame_jax.sampling.bounded_http import BoundedHTTPServer
from advgame_jax.sampling.openai_protocol import (
    Limits, ParsedRequest, RequestError, build_response, parse_chat, parse_completions)

log = logging.getLogger(__name__)

# Markers of an exported attacker: our own marker file, and the training exporter's
# (advgame_jax.training.export: marker file + config.json field).
ATTACKER_MARKER_FILES = ("ADVGAME_ATTACKER", "ADVGAME_CONTROLLED_ARTIFACT.json")
ATTACKER_CONFIG_FIELDS = ("advgame_controlled_artifact", "advgame_role")


class AttackerCheckpointError(UserError, PermissionError):
    """Serving an attacker checkpoint without ``allow_attacker``."""


def is_attacker_checkpoint(model_dir: str) -> bool:
    """True when ``model_dir`` holds attacker weights (``controlled.is_attacker_artifact``)."""
    from advgame_jax.controlled import is_attacker_artifact

    return is_attacker_artifact(model_dir)


def check_servable(model_dir: str, *, allow_attacker: bool) -> None:
    """Raise ``AttackerCheckpointError`` for an attacker checkpoint unless allowed (the one
    gate, ``controlled.require_attacker_allowed``)."""
    from advgame_jax.controlled import require_attacker_allowed

    require_attacker_allowed(model_dir, allow_attacker, "--model_dir",
                             error=AttackerCheckpointError)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Network, auth and load limits of one server (``limits``: per-request bounds)."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0 = an ephemeral port (tests)
    api_key: Optional[str] = None
    model_name: str = "advgame"
    max_body_bytes: int = 1 << 20
    queue_size: int = 64
    max_batch_requests: int = 16
    request_timeout_s: float = 600.0
    max_connections: int = 32
    max_overflow: int = 32
    listen_backlog: int = 128
    limits: Limits = Limits()


@dataclasses.dataclass(eq=False)
class _Job:
    request: ParsedRequest
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Any = None
    error: Optional[BaseException] = None


_STOP = object()


class OpenAIServer:
    """The server: ``start()`` (background thread), ``url``, ``shutdown()``; a context manager."""

    def __init__(self, sampler, tokenizer, config: ServerConfig = ServerConfig()):
        if tokenizer is None or not hasattr(tokenizer, "encode"):
            raise ValueError("OpenAIServer needs a tokenizer (a ChatTokenizer) to render "
                             "chat messages and text prompts")
        self.sampler, self.tokenizer, self.config = sampler, tokenizer, config
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._closing = threading.Event()
        self._httpd = BoundedHTTPServer(
            (config.host, config.port), _Handler, _OverloadedHandler,
            max_connections=config.max_connections, max_overflow=config.max_overflow,
            backlog=config.listen_backlog, closing=self._closing)
        self._httpd.app = self  # type: ignore[attr-defined]
        self._threads: list[threading.Thread] = []
        self.batches_served = 0  # generate calls made by the worker

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "OpenAIServer":
        for target in (self._worker, self._httpd.serve_forever):
            t = threading.Thread(target=target, daemon=True, name=f"advgame-serve-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def shutdown(self, timeout: float = 60.0) -> None:
        """Refuse new work, finish the queued jobs (their responses are sent), close."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._threads:
            self._queue.put(_STOP)  # FIFO: every job queued before it is served first
            self._threads[0].join(timeout)
            # A job that slipped in behind the stop marker is answered, not left waiting.
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(job, _Job):
                    job.error = RequestError(503, "the server is shutting down",
                                             type="server_error", code="shutting_down")
                    job.done.set()
            self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    # ------------------------------------------------------------------ worker
    def submit(self, request: ParsedRequest) -> _Job:
        if self._closing.is_set():
            raise RequestError(503, "the server is shutting down", type="server_error",
                               code="shutting_down")
        job = _Job(request)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"the request queue is full ({self.config.queue_size} "
                               f"waiting); retry later", type="server_error",
                               code="server_overloaded") from None
        return job

    def _worker(self):
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            while len(batch) < self.config.max_batch_requests:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[_Job]):
        self.batches_served += 1
        try:
            if hasattr(self.sampler, "generate_many"):
                results = self.sampler.generate_many(
                    [(j.request.prompts, j.request.params) for j in batch])
            else:
                results = [self.sampler.generate(j.request.prompts, j.request.params)
                           for j in batch]
            for job, res in zip(batch, results):
                job.result = res
        except Exception as err:  # isolate the failing request instead of failing the batch
            if len(batch) == 1:
                log.exception("generation failed")
                batch[0].error = err
            else:
                for job in batch:
                    self._run([job])
                return
        for job in batch:
            job.done.set()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "advgame-serve"
    timeout = 120  # seconds a client may stall mid-request before its socket is dropped

    @property
    def app(self) -> OpenAIServer:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, fmt, *args):  # route access logs through logging, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: dict, *, close: bool = False):
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: RequestError, *, close: bool = False):
        self._send(err.status, err.body(), close=close)

    def _authorized(self) -> bool:
        key = self.app.config.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode("utf-8"), f"Bearer {key}".encode("utf-8")):
            return True
        self._error(RequestError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                 code="invalid_api_key"), close=True)
        return False

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self._not_found_or_method("GET")
        if not self._authorized():
            return
        self._send(200, {"object": "list", "data": [{
            "id": self.app.config.model_name, "object": "model", "created": 0,
            "owned_by": "advgame_jax"}]})

    def do_POST(self):
        route = {"/v1/chat/completions": parse_chat, "/v1/completions": parse_completions}
        parse = route.get(self.path.rstrip("/"))
        if parse is None:
            return self._not_found_or_method("POST")
        if not self._authorized():
            return
        try:
            body = self._read_json()
            if isinstance(body, dict) and body.get("model") not in (None, self.app.config.model_name):
                raise RequestError(404, f"model {body.get('model')!r} does not exist; this "
                                   f"server serves {self.app.config.model_name!r}",
                                   code="model_not_found", param="model")
            try:
                request = parse(body, self.app.tokenizer, self.app.config.limits)
            except RequestError:
                raise
            except Exception as err:  # noqa: BLE001 - whatever the body made the parser do
                raise RequestError(400, f"malformed request: {type(err).__name__}: "
                                   f"{str(err)[:200]}") from None
            job = self.app.submit(request)
            if not job.done.wait(self.app.config.request_timeout_s):
                raise RequestError(503, "generation timed out", type="server_error",
                                   code="timeout")
            if isinstance(job.error, RequestError):
                raise job.error
            if job.error is not None:
                raise RequestError(500, f"generation failed: {job.error}", type="server_error")
            self._send(200, build_response(request, job.result, self.app.tokenizer,
                                           self.app.config.model_name))
        except RequestError as err:
            self._error(err, close=err.status in (411, 413))

    def _read_json(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(411, "chunked request bodies are not supported; send "
                               "Content-Length", code="length_required")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestError(411, "Content-Length header required", code="length_required")
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            raise RequestError(400, f"invalid Content-Length {raw!r}") from None
        limit = self.app.config.max_body_bytes
        if length > limit:
            self._discard(length, cap=16 * limit)
            raise RequestError(413, f"request body of {length} bytes exceeds the limit of "
                               f"{limit} bytes", code="request_too_large")
        data = self.rfile.read(length)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise RequestError(400, f"the request body is not valid JSON: {err}") from None
        except RecursionError:
            raise RequestError(400, "the request body is nested too deeply") from None

    def _discard(self, length: int, cap: int):
        # Read (and drop) a moderately oversize body so the client, which sends it before
        # reading any reply, sees the 413 instead of a reset connection; beyond ``cap`` the
        # connection is simply closed after the reply.
        if length > cap:
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                return
            length -= len(chunk)

    def _not_found_or_method(self, method):
        known = {"/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST"}
        want = known.get(self.path.rstrip("/"))
        if want is not None and want != method:
            return self._error(RequestError(405, f"{self.path} accepts {want}, not {method}",
                                            code="method_not_allowed"), close=True)
        self._error(RequestError(404, f"no route {method} {self.path}", code="not_found"),
                    close=True)


class _OverloadedHandler(_Handler):
    """Serves a connection that arrived while every worker thread was busy: reads the
    request (so the client sees a reply, not a reset) and answers 503."""

    def _busy(self):
        err = RequestError(503, "the server is at its connection limit; retry later",
                           type="server_error", code="server_overloaded")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        self._discard(length, cap=self.app.config.max_body_bytes)
        self._error(err, close=True)

    do_GET = do_POST = _busy


def serve_model_dir(model_dir: str, *, config: ServerConfig = ServerConfig(),
                    allow_attacker: bool = False, mesh=None, compute_dtype=None,
                    max_batch_size: int = 64) -> OpenAIServer:
    """Build (not start) a server over an HF checkpoint dir with the JAX sampler.

    The directory must hold the tokenizer too (``ChatTokenizer.from_dir``). Raises
    ``AttackerCheckpointError`` for an attacker checkpoint without ``allow_attacker``.
    """
    check_servable(model_dir, allow_attacker=allow_attacker)
    from advgame_jax.sampling.jax_sampler import JaxSampler
    from advgame_jax.tokenization import ChatTokenizer

    tokenizer = ChatTokenizer.from_dir(model_dir)
    sampler = JaxSampler.from_hf_dir(
        model_dir, tokenizer=tokenizer, mesh=mesh, compute_dtype=compute_dtype,
        max_batch_size=max_batch_size, min_batch_bucket=min(8, max_batch_size),
        min_prompt_bucket=64, max_prompt_len=max(config.limits.max_prompt_tokens, 16))
    return OpenAIServer(sampler, tokenizer, config)


def make_tiny_model_dir(path: str, *, seed: int = 0) -> str:
    """A tiny random Llama + the tiny offline tokenizer in ``path`` (demo and tests)."""
    import jax

    from advgame_jax.models import ModelConfig, init_params, save_hf
    from advgame_jax.tokenization import ChatTokenizer, build_tiny_tokenizer

    build_tiny_tokenizer(path)
    tok = ChatTokenizer.from_dir(path)
    config = ModelConfig(
        model_type="llama", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, max_position_embeddings=4096,
        eos_token_id=tok.stop_token_ids[0], pad_token_id=tok.pad_id)
    save_hf(path, config, init_params(config, jax.random.key(seed), std=0.15))
    return path


def wait_forever(server: OpenAIServer, stop: threading.Event) -> None:
    """Block until ``stop`` is set (e.g. by a signal handler), then shut down gracefully."""
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
