"""``EndpointBackend``: judge prompts sent to OpenAI-compatible servers (``/v1/chat/completions``)
through the project's one HTTP client (``advgame_jax.net``), and the judge's start-up check.

Throughput. The requests of one batch run concurrently across all endpoints (replicas): at
most ``concurrency`` in flight in total and at most ``max_in_flight_per_endpoint`` on any one
endpoint, each attempt to the least-loaded healthy endpoint (``net.replicas``).

Deadlines and retries (``net.client``). ``timeout_s`` is wall-clock per request, retries and
backoff included, and holds against a server trickling its answer one byte at a time.
Timeouts, connection errors, HTTP 408/429/5xx and malformed JSON bodies are retried up to
``max_retries`` times while time is left (``Retry-After`` honoured, else exponential backoff
with seeded jitter); other HTTP errors are not. A request that still fails returns None and
never raises.

Decoding. Every request carries every sampling field (``temperature``, ``top_p``,
``max_tokens`` and, with ``explicit_sampling``, ``top_k=-1``, ``min_p=0``,
``repetition_penalty=1``, ``presence_penalty=0``, ``frequency_penalty=0``): a vLLM server
fills unset fields from the model's ``generation_config.json`` (Qwen2.5-Instruct: top_k 20,
repetition_penalty 1.05), which would make the judge decode differently from the reference.

Fault kinds counted (cumulative, ``fault_counts()``): ``timeout``, ``connection``,
``http_5xx``, ``http_429``, ``http_4xx``, ``malformed_json`` (per failed attempt),
``retries`` and ``failed_requests``. A failure-rate warning (``net.replicas``) is logged from
the first batch whose failure rate crosses ``warn_failure_rate``, then at most every
``warn_every`` batches, with each endpoint's health.

Start-up: ``check_endpoints()`` GETs ``<base>/models`` on each endpoint and raises one
``JudgeEndpointError`` naming every unreachable URL, or ``config.judge.model`` and the served
names when the model is not served. ``probe_judge(judge)`` then sends one faithfulness and one
pairwise probe and warns (raw reply, fields to look at) when an answer does not parse.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any, Callable, Optional, Sequence

from advgame_jax.errors import UserError
from advgame_jax.net import Client, ClientError, FailureRateMonitor, chat_text, served_models

log = logging.getLogger("advgame_jax.judge")


class JudgeEndpointError(UserError, RuntimeError):
    """A judge endpoint cannot be reached or is misconfigured."""


# Fields vLLM would otherwise take from the model's generation_config.json.
NEUTRAL_SAMPLING = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                    "presence_penalty": 0.0, "frequency_penalty": 0.0}


class EndpointBackend:
    """Concurrent, retrying client of one or more OpenAI-compatible chat endpoints.

    endpoints: base URLs such as ``http://host:8000/v1``; model: the served model name.
    api_key: sent as ``Authorization: Bearer`` when given (never logged).
    timeout_s: wall-clock limit per request, retries included; max_retries: re-sends after
    the first attempt. concurrency: requests in flight in total;
    max_in_flight_per_endpoint: per replica (0: no per-replica bound).
    unhealthy_after / unhealthy_cooldown_s: replica health (``net.replicas``).
    warn_failure_rate / warn_every: failure-rate warning (module docstring).
    temperature / top_p / max_tokens / explicit_sampling: decoding (module docstring).
    seed: seeds the backoff jitter. sleep / clock: injectable for tests.
    """

    def __init__(self, endpoints: Sequence[str], model: str, *, api_key: Optional[str] = None,
                 timeout_s: float = 120.0, max_retries: int = 3, concurrency: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 8192,
                 explicit_sampling: bool = True, backoff_s: float = 0.5,
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
        if not timeout_s > 0 or max_retries < 0 or concurrency < 1:
            raise JudgeEndpointError(f"judge endpoint options: expected timeout_s > 0, max_retries "
                                     f">= 0, concurrency >= 1; got {timeout_s}, {max_retries}, {concurrency}")
        if not 0.0 < float(top_p) <= 1.0:
            raise JudgeEndpointError(f"judge top_p: expected a number in (0, 1], got {top_p!r}")
        self.endpoints = tuple(endpoints)
        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.max_tokens = int(max_tokens)
        self.explicit_sampling = bool(explicit_sampling)
        try:
            self.client = Client(
                self.endpoints, api_key=api_key, timeout_s=timeout_s, max_retries=max_retries,
                backoff_s=backoff_s, max_backoff_s=max_backoff_s, seed=seed,
                max_connections=max(self.concurrency, 1),
                max_in_flight_per_endpoint=max_in_flight_per_endpoint,
                unhealthy_after=unhealthy_after, unhealthy_cooldown_s=unhealthy_cooldown_s,
                field="config.judge.endpoints", sleep=sleep, clock=clock)
            self._monitor = FailureRateMonitor(
                threshold=warn_failure_rate, every=warn_every, what="JUDGE",
                consequence="their slots become judge error values",
                details=lambda: (f"Endpoints: {self.client.router.describe()}. Faults so far: "
                                 f"{self.client.fault_counts()}"))
        except ValueError as err:
            raise JudgeEndpointError(f"judge endpoint options: {err}") from None

    def __repr__(self) -> str:
        return f"EndpointBackend(endpoints={self.endpoints}, model={self.model!r})"

    @property
    def warnings_logged(self) -> int:
        return self._monitor.warnings_logged

    def payload(self, prompt: str) -> dict:
        """The JSON body of one judge request."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens}
        if self.explicit_sampling:
            body.update(NEUTRAL_SAMPLING)
        return body

    def check_endpoints(self) -> list[str]:
        """The served model names; raises ``JudgeEndpointError`` naming each endpoint that does
        not answer ``GET /models``, or ``config.judge.model`` when an endpoint does not serve it."""
        bad, wrong, names = [], [], []
        for i, base in enumerate(self.endpoints):
            try:
                ids = self.client.get("/models", parse=served_models, replica=i,
                                      timeout_s=min(self.timeout_s, 30.0), max_retries=1,
                                      count=False)
            except ClientError as err:  # any failure means the endpoint is not usable
                bad.append(f"{base}/models ({type(err).__name__}: {err})")
                continue
            names.extend(n for n in ids if n not in names)
            if self.model not in ids:
                wrong.append(f"{base} serves {ids}")
        if bad:
            raise JudgeEndpointError("judge endpoint unreachable: " + "; ".join(bad) +
                                     ". Expected an OpenAI-compatible server (check "
                                     "config.judge.endpoints and that the server is up)")
        if wrong:
            raise JudgeEndpointError(
                f"config.judge.model={self.model!r} is not served: " + "; ".join(wrong) +
                ". Set config.judge.model to one of the served names")
        return names

    def _request(self, prompt: str) -> Optional[str]:
        try:
            return self.client.post("/chat/completions", self.payload(prompt), parse=chat_text)
        except ClientError:
            return None

    def probe(self, prompt: str) -> tuple[Optional[str], str]:
        """One uncounted request: (answer or None, why it failed)."""
        try:
            return self.client.post("/chat/completions", self.payload(prompt), parse=chat_text,
                                    count=False), ""
        except ClientError as err:
            return None, f"{type(err).__name__}: {err}"

    def complete(self, prompts: Sequence[str]) -> list[Optional[str]]:
        """One answer per prompt (None where every attempt failed), in order."""
        if not prompts:
            return []
        workers = min(self.concurrency, len(prompts))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            out = list(pool.map(self._request, prompts))
        self._monitor.note(len(out), sum(o is None for o in out))
        return out

    def endpoint_health(self) -> list[dict]:
        return self.client.endpoint_health()

    def fault_counts(self) -> dict[str, int]:
        return self.client.fault_counts()


_PROBE_SEED = "How do I bake bread at home?"
_PROBE_ATTACK = "Explain, step by step, how to bake a simple loaf of bread at home."
_PROBE_FIELDS = ("config.judge.model (an instruction-following judge), config.judge.max_new_tokens "
                 "(an answer cut short loses its closing tag), config.judge.temperature / top_p, "
                 "and config.game.templates (the judge prompts and the tags they ask for)")


def probe_judge(judge: Any) -> list[str]:
    """Send one faithfulness and one pairwise probe through ``judge`` (an ``LLMJudge`` on an
    ``EndpointBackend``); log one warning per probe whose answer does not parse (its raw reply's
    first 200 characters and the config fields to look at). Returns those warnings. The
    probes are not counted in the judge's faults or failure rate."""
    from advgame_jax.game import parsing

    backend, templates = judge.backend, judge.templates
    probes = (
        ("faithfulness", templates.faithfulness_prompt(_PROBE_SEED, _PROBE_ATTACK, "benign"),
         lambda t: parsing.parse_faith_verdict(t) is not None),
        ("pairwise", templates.pairwise_prompt(
            "compliance", _PROBE_SEED, "Mix flour, water, yeast and salt; knead, let it rise, "
                                       "then bake at 220 C for 30 minutes.",
            "I cannot help with that."),
         lambda t: parsing.parse_pair_scores(t)[0] is not None))
    warnings = []
    for kind, prompt, parses in probes:
        text, why = backend.probe(prompt)
        if text is not None and parses(text):
            continue
        got = (f"the request failed ({why[:200]})" if text is None else
               f"the raw reply was {text[:200]!r}")
        msg = (f"judge start-up probe: the {kind} answer of {backend.model!r} does not parse: "
               f"{got}. Every such judgment becomes a judge error value; look at {_PROBE_FIELDS}")
        log.warning("%s", msg)
        warnings.append(msg)
    return warnings
