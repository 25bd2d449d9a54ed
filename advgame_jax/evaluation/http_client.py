"""A small client of OpenAI-compatible servers (``launch/serve.py``, vLLM, hosted APIs) for
evaluation: chat or text completions with an explicit seed, finish reason and token count.

``check()`` probes ``GET /models`` once, so an unreachable endpoint is one clear
:class:`EndpointUnreachable` before any generation. Per-request transport faults are retried
(``max_retries``) and then reported as a ``None`` answer, never raised: the caller counts
them as failures.
"""

from __future__ import annotations

from advgame_jax.errors import UserError
import concurrent.futures
import dataclasses
import json
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence


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


class OpenAIClient:
    """``base_url``: e.g. ``http://127.0.0.1:8000/v1``. ``api``: 'chat' (the prompt is one user
    turn) or 'completions' (the prompt is sent as raw text)."""

    def __init__(self, base_url: str, model: str, *, api: str = "chat",
                 api_key: Optional[str] = None, timeout_s: float = 300.0, max_retries: int = 2,
                 concurrency: int = 8, field: str = "endpoint"):
        base_url = str(base_url or "").rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"{field}: expected an http(s):// base URL such as "
                             f"http://127.0.0.1:8000/v1, got {base_url!r}")
        if api not in ("chat", "completions"):
            raise ValueError(f"{field}: api must be 'chat' or 'completions', got {api!r}")
        self.base_url, self.model, self.api, self.field = base_url, model, api, field
        self._api_key = api_key or None
        self.timeout_s, self.max_retries, self.concurrency = timeout_s, max_retries, concurrency
        self.failures = 0

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return h

    def check(self) -> list[str]:
        """Served model ids; raises :class:`EndpointUnreachable` naming the field and URL."""
        url = f"{self.base_url}/models"
        try:
            req = urllib.request.Request(url, headers=self._headers(), method="GET")
            with urllib.request.urlopen(req, timeout=min(self.timeout_s, 30.0)) as resp:
                ids = [m.get("id") for m in json.loads(resp.read().decode("utf-8"))["data"]]
        except Exception as err:  # any failure: not usable
            raise EndpointUnreachable(
                f"{self.field}: {url} is not reachable as an OpenAI-compatible server "
                f"({type(err).__name__}: {err}); start the server or fix the URL") from None
        if self.model and ids and self.model not in ids:
            raise EndpointUnreachable(f"{self.field}: {url} serves {ids}, not model {self.model!r}")
        return ids

    def _once(self, r: Request) -> Answer:
        body = {"model": self.model, "max_tokens": r.max_tokens, "temperature": r.temperature,
                "top_p": r.top_p, "seed": r.seed, "n": 1}
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": r.prompt}]
        else:
            body["prompt"] = r.prompt
        req = urllib.request.Request(f"{self.base_url}/{'chat/' if self.api == 'chat' else ''}"
                                     "completions", data=json.dumps(body).encode(),
                                     headers=self._headers(), method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            out = json.loads(resp.read().decode("utf-8"))
        choice = out["choices"][0]
        text = choice["message"]["content"] if self.api == "chat" else choice["text"]
        if not isinstance(text, str):
            raise ValueError("completion text is not a string")
        usage = out.get("usage") or {}
        return Answer(text, str(choice.get("finish_reason") or "stop"),
                      usage.get("completion_tokens"))

    def _request(self, r: Request) -> Optional[Answer]:
        for attempt in range(self.max_retries + 1):
            try:
                return self._once(r)
            except urllib.error.HTTPError as err:
                if 400 <= err.code < 500 and err.code != 429:
                    break
            except Exception:  # transport fault or malformed body: retry
                pass
            if attempt < self.max_retries:
                time.sleep(min(8.0, 0.5 * 2 ** attempt))
        self.failures += 1
        return None

    def complete(self, requests: Sequence[Request]) -> list[Optional[Answer]]:
        if not requests:
            return []
        with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._request, requests))
