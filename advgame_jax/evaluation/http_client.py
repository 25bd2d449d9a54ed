"""Evaluation requests to OpenAI-compatible servers (``launch/serve.py``, vLLM, hosted APIs):
chat or text completions with an explicit seed, finish reason and token count, through the
project's one HTTP client (``advgame_jax.net``).

``check()`` probes ``GET /models`` once, so an unreachable endpoint, or one that does not
serve the model, is one clear :class:`EndpointUnreachable` before any generation.
``timeout_s`` is a wall-clock deadline per request, retries included (a server trickling its
answer still fails at it). Per-request faults are retried (``max_retries``) and then reported
as a ``None`` answer, never raised: the caller counts them as failures (``failures``); a
warning is logged from the first batch whose failure rate crosses ``warn_failure_rate``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from advgame_jax.errors import UserError
from advgame_jax.net import (
    DEFAULT_TIMEOUT_S,
    Client,
    FailureRateMonitor,
    chat_text,
    check_models,
    run_batch,
)


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
    timeout_s: float = DEFAULT_TIMEOUT_S
    field: str = "endpoint"


class OpenAIClient:
    """Requests to the endpoint ``spec`` names; ``concurrency`` requests in flight at most;
    ``client_options``: the rest of ``net.Client``."""

    def __init__(
        self,
        spec: EndpointSpec,
        *,
        max_retries: int = 2,
        concurrency: int = 8,
        warn_failure_rate: float = 0.1,
        warn_every: int = 10,
        **client_options,
    ):
        api, field, timeout_s = spec.api, spec.field, spec.timeout_s
        if api not in ("chat", "completions"):
            raise ValueError(f"{field}: api must be 'chat' or 'completions', got {api!r}")
        if not timeout_s or not float(timeout_s) > 0:
            raise ValueError(f"{field}: the request timeout must be > 0 seconds, got {timeout_s!r}")
        self.client = Client(
            [spec.base_url],
            api_key=spec.api_key,
            timeout_s=timeout_s,
            max_retries=max_retries,
            max_connections=max(int(concurrency), 1),
            field=field,
            **client_options,
        )
        self.spec, self.base_url, self.model = spec, self.client.endpoints[0], spec.model
        self.api, self.field, self.timeout_s = api, field, float(timeout_s)
        self.max_retries, self.concurrency = max_retries, concurrency
        self.fault_counts = self.client.fault_counts
        self._monitor = FailureRateMonitor(
            threshold=warn_failure_rate,
            every=warn_every,
            what=f"ENDPOINT {field}",
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
        ids, bad, wrong = check_models(self.client, self.model, min(self.timeout_s, 30.0))
        if bad:
            raise EndpointUnreachable(
                f"{self.field}: {bad[0]} is not reachable as an "
                "OpenAI-compatible server; start the server or fix the URL"
            )
        if wrong:
            raise EndpointUnreachable(f"{self.field}: {wrong[0]}, not model {self.model!r}")
        return ids

    def payload(self, r: Request) -> dict:
        prompt = (
            {"messages": [{"role": "user", "content": r.prompt}]}
            if self.api == "chat"
            else {"prompt": r.prompt}
        )
        return {
            "model": self.model,
            "max_tokens": r.max_tokens,
            "temperature": r.temperature,
            "top_p": r.top_p,
            "seed": r.seed,
            "n": 1,
            **prompt,
        }

    def _parse(self, out: Any) -> Answer:
        choice = out["choices"][0]
        text = chat_text(out) if self.api == "chat" else choice["text"]
        if not isinstance(text, str):
            raise ValueError("completion text is not a string")
        usage = out.get("usage") or {}
        return Answer(
            text, str(choice.get("finish_reason") or "stop"), usage.get("completion_tokens")
        )

    def complete(self, requests: Sequence[Request]) -> list[Optional[Answer]]:
        path = "/chat/completions" if self.api == "chat" else "/completions"
        return run_batch(
            lambda r: self.client.post(path, self.payload(r), parse=self._parse),
            requests,
            self.concurrency,
            self._monitor,
        )
