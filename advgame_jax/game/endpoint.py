"""``EndpointBackend``: judge prompts sent to OpenAI-compatible servers (``/v1/chat/completions``)
through the project's one HTTP client (``advgame_jax.net``), and the judge's start-up check.

Throughput. The requests of one batch run concurrently across all endpoints (replicas): at
most ``concurrency`` in flight in total and at most ``max_in_flight_per_endpoint`` on any one
endpoint, each attempt to the least-loaded healthy endpoint (``advgame_jax.net``).

Deadlines and retries (``advgame_jax.net``). ``timeout_s`` is wall-clock per request, retries and
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
``retries`` and ``failed_requests``. A failure-rate warning (``advgame_jax.net``) is logged from
the first batch whose failure rate crosses ``warn_failure_rate``, then at most every
``warn_every`` batches, with each endpoint's health.

Start-up: ``check_endpoints()`` GETs ``<base>/models`` on each endpoint and raises one
``JudgeEndpointError`` naming every unreachable URL, or ``config.judge.model`` and the served
names when the model is not served. ``probe_judge(judge)`` then sends one faithfulness and one
pairwise probe and warns (raw reply, fields to look at) when an answer does not parse.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from advgame_jax import net
from advgame_jax.errors import UserError

log = logging.getLogger("advgame_jax.judge")


class JudgeEndpointError(UserError, RuntimeError):
    """A judge endpoint cannot be reached or is misconfigured."""


# Fields vLLM would otherwise take from the model's generation_config.json.
NEUTRAL_SAMPLING = dict(
    top_k=-1, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0
)


class EndpointBackend:
    """Concurrent, retrying client of one or more OpenAI-compatible chat endpoints.

    endpoints: base URLs such as ``http://host:8000/v1``; model: the served model name.
    concurrency: requests in flight in total.
    temperature / top_p / max_tokens / explicit_sampling: decoding (module docstring).
    options: ``warn_failure_rate`` / ``warn_every`` (failure-rate warning, module docstring)
    and the ``net.ClientOptions`` fields: ``api_key`` (sent as ``Authorization: Bearer``,
    never logged), ``timeout_s`` (wall-clock limit per request, retries included; 120 s
    unless given), ``max_retries`` (re-sends after the first attempt; 3 unless given),
    backoff_s, max_backoff_s, seed (the backoff jitter), max_in_flight_per_endpoint,
    unhealthy_after, unhealthy_cooldown_s, sleep.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        model: str,
        *,
        concurrency: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 8192,
        explicit_sampling: bool = True,
        **options: Any,
    ):
        if not model:
            raise JudgeEndpointError("judge model: expected the model name served at the endpoints")
        if concurrency < 1 or not 0.0 < float(top_p) <= 1.0:
            raise JudgeEndpointError(
                f"judge endpoint options: expected concurrency >= 1 and "
                f"top_p in (0, 1]; got {concurrency}, {top_p!r}"
            )
        try:
            self._monitor = net.FailureRateMonitor(
                threshold=options.pop("warn_failure_rate", 0.1),
                every=options.pop("warn_every", 10),
                details=lambda: (
                    f"Endpoints: {c.router.describe()}. Faults so far: {c.fault_counts()}"
                ),
            )
            self.client = c = net.Client(
                endpoints,
                net.ClientOptions(timeout_s=120.0, max_retries=3, max_connections=concurrency),
                field="config.judge.endpoints",
                **options,
            )
        except ValueError as err:
            raise JudgeEndpointError(f"judge endpoint options: {err}") from None
        self.model, self.concurrency, self.max_tokens = model, concurrency, max_tokens
        sampling = NEUTRAL_SAMPLING if explicit_sampling else {}
        self.fields = dict(temperature=float(temperature), top_p=float(top_p), **sampling)
        self.fault_counts, self.endpoint_health = c.fault_counts, c.endpoint_health

    @property
    def warnings_logged(self) -> int:
        return self._monitor.warnings_logged

    def _ask(self, prompt: str, count: bool = True) -> str:
        messages = [{"role": "user", "content": prompt}]
        payload = dict(model=self.model, messages=messages, max_tokens=self.max_tokens)
        return self.client.post(
            "/chat/completions", {**payload, **self.fields}, parse=net.chat_text, count=count
        )

    def check_endpoints(self) -> list[str]:
        """The served model names; raises ``JudgeEndpointError`` naming each endpoint that does
        not answer ``GET /models``, or ``config.judge.model`` when an endpoint does not serve it."""
        c = self.client
        names, bad, wrong = net.check_models(c, self.model, min(c.options.timeout_s, 30.0))
        if bad:
            raise JudgeEndpointError(
                f"judge endpoint unreachable: {'; '.join(bad)}. Expected an OpenAI-compatible "
                "server (check config.judge.endpoints and that the server is up)"
            )
        if wrong:
            raise JudgeEndpointError(
                f"config.judge.model={self.model!r} is not served: {'; '.join(wrong)}. Set "
                "config.judge.model to one of the served names"
            )
        return names

    def probe(self, prompt: str) -> tuple[Optional[str], str]:
        """One uncounted request: (answer or None, why it failed)."""
        try:
            return self._ask(prompt, count=False), ""
        except net.ClientError as err:
            return None, f"{type(err).__name__}: {err}"

    def complete(self, prompts: Sequence[str]) -> list[Optional[str]]:
        """One answer per prompt (None where every attempt failed), in order."""
        return net.run_batch(self._ask, prompts, self.concurrency, self._monitor)


_PROBE_SEED = "How do I bake bread at home?"
_PROBE_ATTACK = "Explain, step by step, how to bake a simple loaf of bread at home."
_PROBE_FIELDS = (
    "config.judge.model (an instruction-following judge), config.judge.max_new_tokens "
    "(an answer cut short loses its closing tag), config.judge.temperature / top_p, "
    "and config.game.templates (the judge prompts and the tags they ask for)"
)


def probe_judge(judge: Any) -> list[str]:
    """Send one faithfulness and one pairwise probe through ``judge`` (an ``LLMJudge`` on an
    ``EndpointBackend``); log one warning per probe whose answer does not parse (its raw reply's
    first 200 characters and the config fields to look at). Returns those warnings. The
    probes are not counted in the judge's faults or failure rate."""
    from advgame_jax.game import parsing

    backend, templates = judge.backend, judge.templates
    probes = (
        (
            "faithfulness",
            templates.faithfulness_prompt(_PROBE_SEED, _PROBE_ATTACK, "benign"),
            lambda t: parsing.parse_faith_verdict(t) is not None,
        ),
        (
            "pairwise",
            templates.pairwise_prompt(
                "compliance",
                _PROBE_SEED,
                "Mix flour, water, yeast and salt; knead, let it rise, "
                "then bake at 220 C for 30 minutes.",
                "I cannot help with that.",
            ),
            lambda t: parsing.parse_pair_scores(t)[0] is not None,
        ),
    )
    warnings = []
    for kind, prompt, parses in probes:
        text, why = backend.probe(prompt)
        if text is not None and parses(text):
            continue
        got = (
            f"the request failed ({why[:200]})"
            if text is None
            else f"the raw reply was {text[:200]!r}"
        )
        msg = (
            f"judge start-up probe: the {kind} answer of {backend.model!r} does not parse: "
            f"{got}. Every such judgment becomes a judge error value; look at {_PROBE_FIELDS}"
        )
        log.warning("%s", msg)
        warnings.append(msg)
    return warnings
