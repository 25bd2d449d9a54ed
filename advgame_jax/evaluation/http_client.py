"""Evaluation requests to OpenAI-compatible servers (``launch/serve.py``, vLLM, hosted APIs):
chat or text completions with an explicit seed, finish reason and token count, through the
project's one HTTP client (``advgame_jax.net``).

``check()`` probes ``GET /models`` once, so an unreachable endpoint, or one that does not
serve the model, is one clear :class:`EndpointUnreachable` before any generation.
``timeout_s`` is a wall-clock deadline per request, retries included (a server trickling its
answer still fails at it). Per-request faults are retried (``max_retries``) and then reported
as a ``None`` answer, never raised: the caller counts them as failures (``failures``); a
warning is logged from the first batch whose failure rate crosses 10%.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from advgame_jax import net
from advgame_jax.errors import UserError


class EndpointUnreachable(UserError, ConnectionError):
    """An endpoint does not answer ``GET /models`` as an OpenAI-compatible server."""


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # 'stop' | 'length' | whatever the server says
    num_tokens: Optional[int]


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: str
    seed: int
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0


@dataclasses.dataclass(frozen=True)
class EndpointSpec:
    """An OpenAI-compatible endpoint. ``base_url``: e.g. ``http://127.0.0.1:8000/v1``.
    ``api``: 'chat' (the prompt is one user turn) or 'completions' (the prompt is sent as raw
    text). ``api_key``: sent as a bearer token (never shown in ``repr``). ``timeout_s``: the
    deadline per request (module docstring). ``field``: the flag that named the endpoint (in
    every error and warning)."""

    base_url: str
    model: str
    api: str = "chat"
    api_key: Optional[str] = dataclasses.field(default=None, repr=False)
    timeout_s: float = net.DEFAULT_TIMEOUT_S
    field: str = "endpoint"


class OpenAIClient:
    """Requests to the endpoint ``spec`` names; ``concurrency`` requests in flight at most;
    ``client_options``: the rest of ``net.ClientOptions``."""

    def __init__(self, spec: EndpointSpec, *, concurrency: int = 8, **client_options):
        if spec.api not in ("chat", "completions"):
            raise ValueError(f"{spec.field}: api must be 'chat' or 'completions', got {spec.api!r}")
        self.spec, self.concurrency = spec, max(int(concurrency), 1)
        self.client = net.Client(
            [spec.base_url],
            net.ClientOptions(
                spec.api_key, spec.timeout_s, max_retries=2, max_connections=self.concurrency
            ),
            field=spec.field,
            **client_options,
        )
        self.fault_counts = self.client.fault_counts
        self._monitor = net.FailureRateMonitor(
            what=f"ENDPOINT {spec.field}",
            consequence="those examples are recorded as failed generations",
            details=lambda: f"Faults so far: {self.client.fault_counts()}",
            logger="advgame_jax.evaluation",
        )

    @property
    def failures(self) -> int:
        """Requests that got no answer after retries."""
        return self.client.fault_counts().get("failed_requests", 0)

    def check(self) -> list[str]:
        """Served model ids; raises :class:`EndpointUnreachable` naming the field and URL."""
        spec = self.spec
        ids, bad, wrong = net.check_models(self.client, spec.model, min(spec.timeout_s, 30.0))
        if bad:
            raise EndpointUnreachable(
                f"{spec.field}: {bad[0]} is not reachable as an "
                "OpenAI-compatible server; start the server or fix the URL"
            )
        if wrong:
            raise EndpointUnreachable(f"{spec.field}: {wrong[0]}, not model {spec.model!r}")
        return ids

    def _ask(self, r: Request) -> Answer:
        chat = self.spec.api == "chat"
        prompt = {"messages": [{"role": "user", "content": r.prompt}]} if chat else {}
        payload: dict[str, Any] = dict(prompt or {"prompt": r.prompt}, model=self.spec.model)
        payload.update(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p)
        payload.update(seed=r.seed, n=1)
        path = "/chat/completions" if chat else "/completions"
        return self.client.post(path, payload, parse=self._answer)

    def _answer(self, out: Any) -> Answer:
        choice = out["choices"][0]
        text = net.chat_text(out) if self.spec.api == "chat" else choice["text"]
        if not isinstance(text, str):
            raise ValueError("completion text is not a string")
        usage = out.get("usage") or {}
        return Answer(
            text, str(choice.get("finish_reason") or "stop"), usage.get("completion_tokens")
        )

    def complete(self, requests: Sequence[Request]) -> list[Optional[Answer]]:
        return net.run_batch(self._ask, requests, self.concurrency, self._monitor)
